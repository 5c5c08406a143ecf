"""`stedm tile`: tile one slide (and its annotations) into a zarr tile store.

Either look the slide up in a manifest (`--manifest CSV --slide-id ID`, what the workflow does)
or name the files directly (`--slide PATH [--annotation PATH] [--mpp X]`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stedm.config import load_config
from stedm.data.manifest import SlideRecord, read_manifest
from stedm.errors import StedmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="cohort manifest CSV (with --slide-id)")
    source.add_argument("--slide", type=Path, help="a slide file (instead of --manifest)")
    parser.add_argument(
        "--slide-id", help="slide to tile from the manifest (default with --slide: file stem)"
    )
    parser.add_argument("--annotation", type=Path, help="QuPath GeoJSON for --slide")
    parser.add_argument("--patient-id", help="patient of --slide (default: the slide id)")
    parser.add_argument(
        "--mpp", type=float, help="level-0 µm/px, overriding the slide file / manifest"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output tile store (.zarr directory)"
    )
    parser.add_argument("--thumbnail", type=Path, required=True, help="output thumbnail PNG")
    parser.add_argument(
        "--config", help="config YAML file or inline JSON (default: built-in defaults)"
    )


def _record(args: argparse.Namespace) -> SlideRecord:
    if args.mpp is not None and not args.mpp > 0:
        raise StedmError(f"--mpp {args.mpp}: must be a positive number (µm/px)")
    if args.manifest is not None:
        if not args.slide_id:
            raise StedmError("--manifest needs --slide-id (the slide to tile)")
        if args.annotation or args.patient_id:
            raise StedmError(
                "--annotation/--patient-id go with --slide; with --manifest they come from the CSV"
            )
        records = {r.slide_id: r for r in read_manifest(args.manifest)}
        if args.slide_id not in records:
            raise StedmError(f"{args.manifest}: no slide_id '{args.slide_id}' in the manifest")
        record = records[args.slide_id]
        if args.mpp is not None:
            record = SlideRecord(**{**record.__dict__, "mpp": args.mpp})
        return record
    slide_id = args.slide_id or args.slide.stem
    return SlideRecord(
        slide_id=slide_id,
        patient_id=args.patient_id or slide_id,
        slide_path=args.slide,
        annotation_path=args.annotation,
        mpp=args.mpp,
    )


def run(args: argparse.Namespace) -> None:
    from stedm.tiling.tiler import tile_slide

    config = load_config(args.config)
    tile_slide(_record(args), config, args.out, args.thumbnail)
