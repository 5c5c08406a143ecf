"""`stedm merge-synthetic`: join a budget's generation shards into one store, draw the preview.

    stedm merge-synthetic --shards shard~0.zarr shard~1.zarr --tiles-dir results/tiles \\
        --out synthetic.zarr --preview preview.png

The shards must be all K shards of one run (same model, autoencoder and sampler settings, sample
ids 0..N-1 without gaps); arrays are concatenated in shard order, attributes are the shards'
minus the per-shard ones. Because shard boundaries follow fixed micro-batches, the merged store
equals the store of an unsharded run bit for bit.

Preview: ~8 rows of layout (class colours, ignore = grey) | the style-query tiles (as stored in
the tile stores, before the flips applied at generation) | the generated image.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from stedm.errors import StedmError
from stedm.io import atomic_output
from stedm.synthesis.generate import SHARD_ATTRS, create_store, write_columns

log = logging.getLogger(__name__)

PALETTE = np.array(
    [
        (245, 240, 240),
        (235, 150, 190),
        (110, 40, 140),
        (70, 160, 90),
        (240, 180, 60),
        (70, 120, 200),
        (200, 70, 60),
        (120, 120, 40),
    ],
    dtype=np.uint8,
)
IGNORE_COLOUR = (128, 128, 128)
BLOCK = 256  # tiles copied per read/write


def merge_shards(shards: list[Path], out: Path) -> int:
    """Concatenate generation shards into the store `out` (atomically). Returns the sample count."""
    groups = [zarr.open_group(str(s), mode="r") for s in shards]
    order = sorted(range(len(groups)), key=lambda i: int(groups[i].attrs.get("shard", -1)))
    groups = [groups[i] for i in order]
    shards = [shards[i] for i in order]
    attrs = [dict(g.attrs) for g in groups]
    k = attrs[0].get("n_shards")
    if [a.get("shard") for a in attrs] != list(range(len(groups))) or k != len(groups):
        raise StedmError(
            f"need all {k} shards 0..{(k or 0) - 1}, got shard ids {[a.get('shard') for a in attrs]}"
        )
    common = {key: v for key, v in attrs[0].items() if key not in SHARD_ATTRS}
    for shard, a in zip(shards, attrs, strict=True):
        other = {key: v for key, v in a.items() if key not in SHARD_ATTRS}
        if other != common:
            diff = sorted(
                key for key in set(other) | set(common) if other.get(key) != common.get(key)
            )
            raise StedmError(
                f"{shard} was generated with other settings than {shards[0]}: {diff}; regenerate it"
            )
    ids = np.concatenate([np.asarray(g["sample_id"][:]) for g in groups])
    n = int(common["n_samples"])
    if not np.array_equal(ids, np.arange(n)):
        raise StedmError(f"shards hold sample ids {ids[:5]}...; expected 0..{n - 1} without gaps")
    tile = int(common["tile_size"])
    columns = [name for name in groups[0].array_keys() if name not in ("images", "labels")]
    with atomic_output(out) as tmp:
        merged = create_store(tmp, n, tile, common)
        pos = 0
        for g in groups:
            m = g["images"].shape[0]
            for lo in range(0, m, BLOCK):
                hi = min(m, lo + BLOCK)
                merged["images"][pos + lo : pos + hi] = g["images"][lo:hi]
                merged["labels"][pos + lo : pos + hi] = g["labels"][lo:hi]
            pos += m
        write_columns(
            merged,
            {c: np.concatenate([np.asarray(g[c][:]) for g in groups]) for c in sorted(columns)},
        )
    log.info("merged %d shards into %s (%d samples)", len(groups), out, n)
    return n


def colourise(label: np.ndarray, ignore_index: int) -> np.ndarray:
    out = PALETTE[label % len(PALETTE)]
    out[label == ignore_index] = IGNORE_COLOUR
    return out


def write_preview(
    store: Path, tiles_dir: Path | None, out: Path, rows: int = 8, max_styles: int = 4
) -> None:
    """PNG grid, one sample per row: layout | style tiles | generated image (evenly spaced samples)."""
    group = zarr.open_group(str(store), mode="r")
    n, t = group["images"].shape[0], int(group.attrs["tile_size"])
    ignore = int(group.attrs["ignore_index"])
    picks = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(int)) if n else []
    gap, cols = 4, 2 + max_styles
    canvas = np.full((len(picks) * (t + gap) + gap, cols * (t + gap) + gap, 3), 255, np.uint8)
    for r, i in enumerate(picks):
        y = gap + r * (t + gap)
        cells = [colourise(np.asarray(group["labels"][i]), ignore)]
        slide, tiles = str(group["style_slide"][i]), str(group["style_tiles"][i])
        styles = [int(j) for j in tiles.split(";")] if tiles else []
        for j in styles[:max_styles]:
            path = Path(tiles_dir or "") / f"{slide}.zarr"
            cells.append(
                np.asarray(zarr.open_group(str(path), mode="r")["images"][j])
                if path.is_dir()
                else np.full((t, t, 3), 200, np.uint8)
            )
        cells += [np.full((t, t, 3), 255, np.uint8)] * (max_styles - min(len(styles), max_styles))
        cells.append(np.asarray(group["images"][i]))
        for c, cell in enumerate(cells):
            x = gap + c * (t + gap)
            canvas[y : y + t, x : x + t] = cell
    with atomic_output(out) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    log.info("wrote preview %s (%d samples: layout | style tiles | generated)", out, len(picks))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", required=True, nargs="+", type=Path, help="all shard stores of one budget"
    )
    parser.add_argument(
        "--tiles-dir", type=Path, default=None, help="tile stores (style tiles in the preview)"
    )
    parser.add_argument("--out", required=True, type=Path, help="merged synthetic.zarr")
    parser.add_argument("--preview", type=Path, default=None, help="preview PNG")


def run(args: argparse.Namespace) -> None:
    merge_shards(args.shards, args.out)
    if args.preview is not None:
        write_preview(args.out, args.tiles_dir, args.preview)
