"""Tile one slide (and its annotations) into a zarr tile store, streaming row by row.

1. Thumbnail at `tiling.thumbnail_mpp` -> tissue mask -> tissue fraction of every cell of a
   non-overlapping grid of `tiling.tile_size` px tiles at `tiling.mpp` (only whole tiles: a
   tile padded with white beyond the slide edge would teach the models a fake border).
2. Cells with tissue fraction >= `tiling.min_tissue_fraction` are kept; their count is known
   before any full-resolution pixel is read, so the store's arrays are created up front.
3. Row by row: each run of neighbouring kept tiles is read as one window (one OpenSlide call),
   cut into tiles (resampled when the pyramid has no level at `tiling.mpp`), labelled by
   rasterising the annotations at tile resolution, and handed to the background writer.
   Memory therefore depends on the slide's width, not its area.
4. The store and the thumbnail PNG are written under temporary names and renamed at the end.

Label values: annotated pixels get their class index; unannotated pixels inside tissue get
`labels.ignore_index` (`labels.unannotated: ignore`) or 0; unannotated pixels outside tissue
get 0 (`labels.outside_tissue: background`) or `ignore_index`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import stedm
from stedm.config import Config
from stedm.data.annotations import Annotations, load_annotations
from stedm.data.manifest import SlideRecord
from stedm.data.slide import Slide, open_slide, resample
from stedm.errors import StedmError
from stedm.io import atomic_output, sha256_file
from stedm.tiling.store import TileStoreWriter
from stedm.tiling.tissue import tissue_mask

log = logging.getLogger(__name__)

MIN_OBJECT_UM2 = 10_000.0  # tissue specks below ~100 x 100 µm are dust, not tissue
MAX_WINDOW_PX = 4_000_000  # cap on one OpenSlide read (16 MB of RGBA)


def _grid(slide: Slide, tile_size: int, mpp: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Level-0 tile extent and the integer level-0 origins of the grid's columns and rows."""
    extent = tile_size * mpp / slide.mpp
    w, h = slide.dimensions
    nx, ny = math.floor(w / extent + 1e-9), math.floor(h / extent + 1e-9)
    xs = np.rint(np.arange(nx) * extent).astype(np.int64)
    ys = np.rint(np.arange(ny) * extent).astype(np.int64)
    return extent, xs, ys


def _tissue_fractions(mask: np.ndarray, nx: int, ny: int, cell: float) -> np.ndarray:
    """(ny, nx) mean of the mask over each grid cell (`cell` = tile extent in mask pixels)."""
    h, w = mask.shape
    box = (0.0, 0.0, min(nx * cell, w), min(ny * cell, h))
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((nx, ny), Image.Resampling.BOX, box=box), dtype=np.float32)


def _runs(columns: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Split sorted column indices into runs of consecutive values, at most max_len long."""
    if columns.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(columns) != 1) + 1
    runs = []
    for run in np.split(columns, breaks):
        runs += [run[i : i + max_len] for i in range(0, len(run), max_len)]
    return runs


class _Labeller:
    """Label tiles: annotation classes over a tissue-dependent background."""

    def __init__(
        self, annotations: Annotations, config: Config, mask: np.ndarray, thumb_scale: float
    ):
        labels = config.labels
        self.annotations = annotations
        unannotated = labels.ignore_index if labels.unannotated == "ignore" else 0
        outside = 0 if labels.outside_tissue == "background" else labels.ignore_index
        self.values = np.array([outside, unannotated], dtype=np.uint8)  # indexed by tissue bool
        self.mask = Image.fromarray(mask.astype(np.uint8))
        self.thumb_scale = thumb_scale  # mask pixels per level-0 pixel
        self.tile_size = config.tiling.tile_size

    def __call__(self, x0: int, y0: int, extent: float) -> np.ndarray:
        t, s = self.tile_size, self.thumb_scale
        box = (x0 * s, y0 * s, (x0 + extent) * s, (y0 + extent) * s)
        tissue = np.asarray(self.mask.resize((t, t), Image.Resampling.NEAREST, box=box))
        return self.annotations.rasterize(x0, y0, t, t, extent / t, self.values[tissue])


def _read_row(
    slide: Slide, xs: np.ndarray, y0: int, run: np.ndarray, tile: int, mpp: float
) -> np.ndarray:
    """Tiles of one run of neighbouring grid columns, read as a single window."""
    plans = [slide.plan(int(xs[i]), y0, tile, mpp) for i in run]
    wx, wy = min(p.x for p in plans), min(p.y for p in plans)
    wx1 = max(p.x + p.width for p in plans)
    wy1 = max(p.y + p.height for p in plans)
    window = slide.read_window(plans[0].level, wx, wy, wx1 - wx, wy1 - wy)
    out = np.empty((len(run), tile, tile, 3), dtype=np.uint8)
    for k, p in enumerate(plans):
        crop = window[p.y - wy : p.y - wy + p.height, p.x - wx : p.x - wx + p.width]
        out[k] = crop if p.box is None else resample(crop, p)
    return out


DISPLAY_PX = 1024  # longest side of the thumbnail PNG


def _draw_thumbnail(thumb: np.ndarray, mask: np.ndarray, boxes: np.ndarray) -> Image.Image:
    """Thumbnail with tissue tinted green and kept tiles outlined in blue."""
    rgb = np.array(thumb, dtype=np.uint8)  # copy; tint only the tissue pixels (small memory)
    tinted = rgb[mask].astype(np.uint16) * 7 // 10
    tinted[:, 1] += 60  # 0.3 * 200: green tint
    rgb[mask] = tinted.astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes.tolist():
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 255))
    return image


def _stream_tiles(
    slide: Slide,
    config: Config,
    xs: np.ndarray,
    ys: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    labeller: _Labeller | None,
    writer: TileStoreWriter,
    desc: str,
) -> np.ndarray:
    """Read, label and hand to `writer` the kept tiles row by row; returns label-value counts."""
    tile, mpp = config.tiling.tile_size, config.tiling.mpp
    extent = tile * mpp / slide.mpp
    one = slide.plan(0, 0, tile, mpp)  # longest run read in one OpenSlide call: window <= cap
    max_run = max(1, MAX_WINDOW_PX // (one.width * one.height))
    class_pixels = np.zeros(256, dtype=np.int64)
    row_starts = np.flatnonzero(np.diff(rows, prepend=-1))
    with tqdm(total=rows.size, desc=desc, unit="tile", mininterval=2.0) as bar:
        for row_cols, r in zip(np.split(cols, row_starts[1:]), rows[row_starts], strict=True):
            y0 = int(ys[r])
            runs = _runs(row_cols, max_run)
            images = np.concatenate([_read_row(slide, xs, y0, run, tile, mpp) for run in runs])
            labels = None
            if labeller is not None:
                labels = np.stack([labeller(int(xs[c]), y0, extent) for c in row_cols])
                class_pixels += np.bincount(labels.ravel(), minlength=256)
            writer.append(images, labels)
            bar.update(len(row_cols))
    return class_pixels


def tile_slide(
    record: SlideRecord, config: Config, out_store: Path, thumbnail_png: Path
) -> dict[str, Any]:
    """Tile one slide into a zarr tile store and draw its tissue/grid thumbnail.

    Args:
        record: the slide (manifest row); `record.mpp` overrides the file's µm/px.
        config: uses the `tiling` and `labels` sections.
        out_store: the `.zarr` directory to write (replaced if present).
        thumbnail_png: the thumbnail PNG to write.

    Returns:
        A summary: slide_id, n_tiles, grid size, seconds, tiles_per_s, paths, annotation stats.

    Raises:
        StedmError: unreadable slide or annotations, missing µm/px, or no tissue tile.
    """
    start = time.perf_counter()
    tiling = config.tiling
    out_store, thumbnail_png = Path(out_store), Path(thumbnail_png)
    tile, mpp = tiling.tile_size, tiling.mpp
    annotations = None
    if record.annotation_path is not None:
        annotations = load_annotations(record.annotation_path, config.labels)
        log.info(
            "%s: %d annotation polygons (%s)",
            record.annotation_path,
            len(annotations.items),
            annotations.stats,
        )
    with (
        open_slide(record.slide_path, record.mpp) as slide,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        # hashlib releases the GIL: hash the slide while we tile it.
        source_sha = pool.submit(sha256_file, record.slide_path)
        log.info("reading %r", slide)
        thumb = slide.thumbnail_mpp(tiling.thumbnail_mpp)
        min_px = max(1, round(MIN_OBJECT_UM2 / tiling.thumbnail_mpp**2))
        mask = tissue_mask(thumb, tiling.tissue_threshold, min_object_px=min_px, max_hole_px=min_px)

        extent, xs, ys = _grid(slide, tile, mpp)
        if xs.size == 0 or ys.size == 0:
            w, h = slide.dimensions
            raise StedmError(
                f"slide {record.slide_id} ({record.slide_path}) is {w}x{h} px, smaller than one "
                f"{tile} px tile at {mpp} µm/px ({extent:.0f} level-0 px); lower tiling.tile_size"
            )
        thumb_scale = slide.mpp / tiling.thumbnail_mpp  # thumbnail px per level-0 px
        fractions = _tissue_fractions(mask, xs.size, ys.size, extent * thumb_scale)
        rows, cols = np.nonzero(fractions >= tiling.min_tissue_fraction)  # row-major: y, then x
        n_tiles = int(rows.size)
        if n_tiles == 0:
            raise StedmError(
                f"slide {record.slide_id} ({record.slide_path}): no tile has tissue fraction >= "
                f"tiling.min_tissue_fraction={tiling.min_tissue_fraction} (best: "
                f"{float(fractions.max()):.2f}, tissue in {mask.mean():.1%} of the thumbnail); lower "
                "tiling.min_tissue_fraction or set tiling.tissue_threshold to a number (e.g. 0.05), "
                "and check the slide is not blank"
            )
        coords = np.stack([xs[cols], ys[rows]], axis=1)
        log.info(
            "grid %dx%d tiles of %d px at %g µm/px (%.1f level-0 px); %d with tissue",
            xs.size,
            ys.size,
            tile,
            mpp,
            extent,
            n_tiles,
        )

        labeller = (
            None if annotations is None else _Labeller(annotations, config, mask, thumb_scale)
        )
        with atomic_output(out_store) as tmp_store:
            writer = TileStoreWriter(
                tmp_store,
                n_tiles,
                tile,
                chunk_tiles=tiling.chunk_tiles,
                labelled=labeller is not None,
            )
            try:
                writer.write_index(coords, fractions[rows, cols])
                class_pixels = _stream_tiles(
                    slide,
                    config,
                    xs,
                    ys,
                    rows,
                    cols,
                    labeller,
                    writer,
                    desc=f"tile {record.slide_id}",
                )
            except BaseException:
                writer.abort()
                raise
            attrs = _attrs(
                record,
                config,
                slide,
                extent,
                n_tiles,
                source_sha.result(),
                annotations,
                class_pixels,
            )
            writer.close(attrs)
            boxes = np.stack(
                [coords[:, 0], coords[:, 1], coords[:, 0] + extent, coords[:, 1] + extent], 1
            )
            # The detection thumbnail is coarse (16 µm/px: 64 px for a 1 mm demo slide); draw the
            # PNG people look at with its longest side near DISPLAY_PX instead.
            display_mpp = max(slide.mpp, max(slide.dimensions) * slide.mpp / DISPLAY_PX)
            display = thumb
            if display_mpp < tiling.thumbnail_mpp:
                display = slide.thumbnail_mpp(display_mpp)
            rows_idx = np.minimum(
                np.arange(display.shape[0]) * mask.shape[0] // display.shape[0], mask.shape[0] - 1
            )
            cols_idx = np.minimum(
                np.arange(display.shape[1]) * mask.shape[1] // display.shape[1], mask.shape[1] - 1
            )
            display_mask = mask[rows_idx][:, cols_idx]
            with atomic_output(thumbnail_png) as tmp_png:
                _draw_thumbnail(display, display_mask, boxes * (slide.mpp / display_mpp)).save(
                    tmp_png, format="PNG"
                )
    seconds = time.perf_counter() - start
    size_mb = sum(f.stat().st_size for f in out_store.rglob("*") if f.is_file()) / 1e6
    log.info(
        "wrote %s (%d tiles, %.1f MB) and %s in %.1f s (%.0f tiles/s)",
        out_store,
        n_tiles,
        size_mb,
        thumbnail_png,
        seconds,
        n_tiles / seconds,
    )
    return {
        "slide_id": record.slide_id,
        "n_tiles": n_tiles,
        "grid": [int(xs.size), int(ys.size)],
        "seconds": seconds,
        "tiles_per_s": n_tiles / seconds,
        "store": str(out_store),
        "thumbnail": str(thumbnail_png),
        "annotation": attrs["annotation"],
    }


def _attrs(
    record: SlideRecord,
    config: Config,
    slide: Slide,
    extent: float,
    n_tiles: int,
    sha: str,
    annotations: Annotations | None,
    class_pixels: np.ndarray,
) -> dict[str, Any]:
    labels = config.labels
    annotation = None
    if annotations is not None:
        counts = {name: int(class_pixels[i]) for i, name in enumerate(labels.classes)}
        counts["ignore"] = (
            int(class_pixels[labels.ignore_index])
            if labels.ignore_index >= len(labels.classes)
            else 0
        )
        annotation = {
            "path": str(record.annotation_path),
            "sha256": sha256_file(record.annotation_path),
            **annotations.stats,
            "class_pixels": counts,
        }
    return {
        "slide_id": record.slide_id,
        "patient_id": record.patient_id,
        "mpp": config.tiling.mpp,
        "source_mpp": slide.mpp,
        "tile_size": config.tiling.tile_size,
        "tile_size_level0": extent,
        "level0_size": list(slide.dimensions),
        "annotated": annotations is not None,
        "class_names": list(labels.classes),
        "ignore_index": labels.ignore_index,
        "n_tiles": n_tiles,
        "source": {
            "path": str(record.slide_path),
            "size_bytes": record.slide_path.stat().st_size,
            "sha256": sha,
        },
        "annotation": annotation,
        "tiling": config.section("tiling"),
        "stedm_version": stedm.__version__,
    }
