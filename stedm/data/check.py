"""`stedm check-data`: validate a manifest and its files before anything runs.

Unlike the stage CLIs, which stop at the first error, this collects every problem and prints one
line per problem (`<file>: <what> -> fix: <fix>`), then a summary: slides, patients, roles,
groups, formats, the µm/px range, and per slide the tissue area (thumbnail tissue mask) and the
area of every class (annotations rasterised at the thumbnail's resolution, so nested annotations
are counted once, as the tiler paints them), in mm². Exit code 1 if there is any problem.

Checks: manifest columns and values; duplicate slide ids; slide files exist, open with OpenSlide
and have a known µm/px (file or manifest `mpp`); some tissue is detected; annotation files exist
and parse, and every class name is mapped by `labels.classes` / `labels.aliases`; annotations lie
inside the slide; a label mask's size times its downsample matches the slide; no patient has
slides in several fixed roles; and `make_splits` succeeds with the config's `splits` (enough
annotated patients for the budgets, validation and test).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stedm.config import Config, load_config
from stedm.data.annotations import AnnotationError, load_annotations
from stedm.data.manifest import REQUIRED_COLUMNS, ROLES, SlideRecord
from stedm.data.slide import SUPPORTED_FORMATS, open_slide
from stedm.data.splits import make_splits
from stedm.errors import StedmError
from stedm.io import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One problem: the file (or manifest line), what is wrong, and how to fix it."""

    file: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what} -> fix: {self.fix}"


@dataclass
class SlideSummary:
    slide_id: str
    mpp: float | None = None
    vendor: str = ""
    tissue_mm2: float | None = None
    class_mm2: dict[str, float] = field(default_factory=dict)
    annotation_stats: dict[str, int] = field(default_factory=dict)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def read_manifest_lenient(path: Path, problems: list[Problem]) -> list[SlideRecord]:
    """The manifest's usable rows; every row problem is appended to `problems` (no raising)."""
    if not path.is_file():
        problems.append(
            Problem(str(path), "manifest not found", "pass --manifest or set cohort.manifest")
        )
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(
            Problem(
                str(path),
                f"missing column(s) {missing}",
                f"add the columns {list(REQUIRED_COLUMNS)} (header row)",
            )
        )
        return []
    records, seen = [], {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        empty = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if empty:
            problems.append(
                Problem(where, f"empty {', '.join(empty)}", "fill in every required column")
            )
            continue
        slide_id = row["slide_id"]
        if slide_id in seen:
            problems.append(
                Problem(
                    where,
                    f"duplicate slide_id '{slide_id}' (first on line {seen[slide_id]})",
                    "give every slide a unique slide_id",
                )
            )
            continue
        seen[slide_id] = line
        if any(ch in slide_id for ch in "/\\ ") or slide_id.startswith("."):
            problems.append(
                Problem(
                    where,
                    f"slide_id '{slide_id}' contains '/', '\\' or spaces",
                    "use letters, digits, '-' and '_' only",
                )
            )
            continue
        split = row.get("split", "")
        if split and split not in ROLES:
            problems.append(
                Problem(
                    where,
                    f"split '{split}' is not one of {list(ROLES)}",
                    "use one of them or leave it empty",
                )
            )
            split = ""
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not mpp > 0:
                problems.append(
                    Problem(
                        where,
                        f"mpp '{row['mpp']}' is not a positive number",
                        "give level-0 µm/px, e.g. 0.25, or leave it empty",
                    )
                )
                mpp = None
        annotation = row.get("annotation_path")
        records.append(
            SlideRecord(
                slide_id=slide_id,
                patient_id=row["patient_id"],
                slide_path=_resolve(path.parent, row["slide_path"]),
                annotation_path=_resolve(path.parent, annotation) if annotation else None,
                group=row.get("group", ""),
                split=split,
                mpp=mpp,
            )
        )
    return records


def _check_slide(record: SlideRecord, config: Config, problems: list[Problem]) -> SlideSummary:
    import openslide

    summary = SlideSummary(record.slide_id)
    path = record.slide_path
    if not path.is_file():
        problems.append(
            Problem(
                str(path),
                "slide file does not exist",
                "fix slide_path (relative paths are relative to the manifest)",
            )
        )
        return summary
    try:
        with openslide.OpenSlide(str(path)) as osr:
            summary.vendor = osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
    except (openslide.OpenSlideError, OSError) as exc:
        problems.append(
            Problem(
                str(path),
                f"OpenSlide cannot open it ({exc})",
                f"convert it to a format OpenSlide reads: {SUPPORTED_FORMATS}",
            )
        )
        return summary
    try:
        slide = open_slide(path, record.mpp)
    except StedmError:
        problems.append(
            Problem(
                str(path), "records no µm/px", "add its level-0 µm/px in the manifest's mpp column"
            )
        )
        return summary
    with slide:
        summary.mpp = slide.mpp
        tiling = config.tiling
        thumb = slide.thumbnail_mpp(tiling.thumbnail_mpp)
        from stedm.tiling.tissue import tissue_mask

        px_mm2 = (tiling.thumbnail_mpp / 1000.0) ** 2
        summary.tissue_mm2 = float(tissue_mask(thumb, tiling.tissue_threshold).sum() * px_mm2)
        if summary.tissue_mm2 == 0:
            problems.append(
                Problem(
                    str(path),
                    "no tissue detected in the thumbnail",
                    "check the slide, or lower tiling.tissue_threshold",
                )
            )
        if record.annotation_path is not None:
            _check_annotations(record, slide, thumb.shape[:2], config, summary, problems)
    return summary


def _check_annotations(
    record: SlideRecord,
    slide,
    thumb_hw: tuple[int, int],
    config: Config,
    summary: SlideSummary,
    problems: list[Problem],
) -> None:
    path = record.annotation_path
    try:
        annotations = load_annotations(path, config.labels)
    except AnnotationError as exc:
        problems.append(Problem(str(exc.path), exc.what, exc.fix))
        return
    except StedmError as exc:  # any other reader error: its message names the fix
        problems.append(Problem(str(path), str(exc), "see the message"))
        return
    summary.annotation_stats = annotations.stats
    mask_size = getattr(annotations, "mask_size", None)
    if mask_size is not None:
        w, h = slide.dimensions
        ds = annotations.downsample
        if abs(mask_size[0] * ds - w) > 2 * ds or abs(mask_size[1] * ds - h) > 2 * ds:
            problems.append(
                Problem(
                    str(path),
                    f"mask {mask_size[0]}x{mask_size[1]} px x downsample {ds:g} does not "
                    f"cover the slide's {w}x{h} level-0 px",
                    f"set downsample in {path.with_suffix('.json').name} to ~{w / mask_size[0]:.4g}",
                )
            )
    th, tw = thumb_hw
    scale = config.tiling.thumbnail_mpp / slide.mpp
    labels = config.labels
    raster = annotations.rasterize(0, 0, tw, th, scale, 255)
    counts = np.bincount(raster.ravel(), minlength=256)
    px_mm2 = (config.tiling.thumbnail_mpp / 1000.0) ** 2
    summary.class_mm2 = {name: float(counts[i] * px_mm2) for i, name in enumerate(labels.classes)}
    if counts[: len(labels.classes)].sum() == 0:
        problems.append(
            Problem(
                str(path),
                "no annotated area inside the slide",
                "annotations must be in level-0 pixel coordinates of this slide",
            )
        )


def _check_patients(
    manifest: Path, records: list[SlideRecord], config: Config, problems: list[Problem]
) -> None:
    roles: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.split:
            roles[r.patient_id].add(r.split)
    several = {p: sorted(s) for p, s in roles.items() if len(s) > 1}
    for patient, fixed in sorted(several.items()):
        problems.append(
            Problem(
                str(manifest),
                f"patient '{patient}' has slides in several roles {fixed}",
                "give all slides of a patient the same split (or leave them empty)",
            )
        )
    if several or not records:
        return  # make_splits would only repeat the first of these
    try:
        make_splits(records, config.splits)
    except StedmError as exc:
        problems.append(
            Problem(
                str(manifest),
                f"cannot split by patient: {exc}",
                "change splits.* in the config or the manifest's split column",
            )
        )


def check_data(manifest: Path, config: Config) -> tuple[list[Problem], dict]:
    """Every problem of a manifest and its files, and a summary (see the module docstring)."""
    problems: list[Problem] = []
    records = read_manifest_lenient(Path(manifest), problems)
    slides = [
        _check_slide(r, config, problems)
        for r in tqdm(records, desc="checking slides", unit="slide", disable=len(records) < 5)
    ]
    _check_patients(Path(manifest), records, config, problems)
    mpps = [s.mpp for s in slides if s.mpp]
    summary = {
        "manifest": str(manifest),
        "n_slides": len(records),
        "n_patients": len({r.patient_id for r in records}),
        "n_annotated": sum(r.annotation_path is not None for r in records),
        "roles": dict(Counter(r.split or "auto" for r in records)),
        "groups": dict(Counter(r.group or "-" for r in records)),
        "formats": dict(
            Counter(
                f"{r.slide_path.suffix or '-'} ({s.vendor or '?'})"
                for r, s in zip(records, slides, strict=True)
            )
        ),
        "mpp_range": [min(mpps), max(mpps)] if mpps else None,
        "slides": {
            s.slide_id: {
                "mpp": s.mpp,
                "tissue_mm2": s.tissue_mm2,
                "class_mm2": s.class_mm2,
                "annotation": s.annotation_stats,
            }
            for s in slides
        },
        "n_problems": len(problems),
    }
    return problems, summary


def format_summary(summary: dict, classes: tuple[str, ...]) -> str:
    lines = [
        f"{summary['n_slides']} slides, {summary['n_patients']} patients, "
        f"{summary['n_annotated']} annotated",
        "roles: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["roles"].items())),
        "groups: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["groups"].items())),
        "formats: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["formats"].items())),
    ]
    if summary["mpp_range"]:
        lines.append("µm/px: {:g} - {:g}".format(*summary["mpp_range"]))
    header = f"{'slide':<24}{'µm/px':>8}{'tissue mm²':>12}" + "".join(
        f"{c[:12]:>14}" for c in classes
    )
    lines += ["", header + f"{'repaired':>10}{'skipped':>9}"]
    for slide_id, s in summary["slides"].items():
        tissue = "-" if s["tissue_mm2"] is None else f"{s['tissue_mm2']:.4g}"
        areas = "".join(
            f"{s['class_mm2'][c]:>14.4g}" if c in s["class_mm2"] else f"{'-':>14}" for c in classes
        )
        stats = s["annotation"]
        lines.append(
            f"{slide_id:<24}{s['mpp'] or '-':>8}{tissue:>12}{areas}"
            f"{stats.get('n_repaired', '-'):>10}{stats.get('n_skipped', '-'):>9}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, help="manifest CSV (default: cohort.manifest)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")
    parser.add_argument("--json", type=Path, help="also write the summary and problems as JSON")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    manifest = args.manifest or config.cohort.manifest
    if manifest is None:
        raise StedmError("no manifest: pass --manifest or set cohort.manifest in the config")
    problems, summary = check_data(Path(manifest), config)
    for problem in problems:
        print(f"problem: {problem}")
    print(("\n" if problems else "") + format_summary(summary, config.labels.classes))
    if args.json:
        write_json(args.json, {**summary, "problems": [dataclasses.asdict(p) for p in problems]})
    if problems:
        raise StedmError(f"{len(problems)} problem(s) in {manifest}; see the lines above")
    print(f"\nno problems in {manifest}")
