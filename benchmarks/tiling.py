"""Tiling throughput and memory: `tile_slide` against a bare OpenSlide `read_region` loop.

For a demo-like slide (2048 px square at 0.5 µm/px) and a large generated slide (20480 px
square, JPEG, written tile by tile so generating it never holds a level in memory), both tiled
at 1.0 µm/px into 128 px tiles, prints:

- tiles/s of `tile_slide` (everything: thumbnail, tissue mask, reads, labels, zarr writes,
  sha256, thumbnail PNG) and of a bare loop of `OpenSlide.read_region` over the same kept tiles
  at the matching pyramid level, and their ratio (target >= 0.7);
- peak RSS of the tiling process (target < 1 GB for the large slide).

Each measurement runs in a fresh subprocess (peak RSS is per process), twice, best of two, so
the ratio is measured in one run under the same machine load.

    python benchmarks/tiling.py [--size 20480] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

TILE, MPP, SOURCE_MPP = 128, 1.0, 0.5

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, slide, out, chunk = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if mode == "tile":
    import shutil
    shutil.rmtree(out / "s.zarr", ignore_errors=True)  # Snakemake removes old outputs too
    from stedm.config import load_config
    from stedm.data.manifest import SlideRecord
    from stedm.tiling.tiler import tile_slide
    config = load_config({"tiling": {"mpp": 1.0, "tile_size": 128, "chunk_tiles": chunk}})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    summary = tile_slide(SlideRecord(slide.stem, "p", slide), config, out / "s.zarr", out / "s.png")
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "n": summary["n_tiles"], "rss_mb": rss, "rss_imports_mb": rss0}))
else:
    import numpy as np, openslide, zarr
    coords = np.asarray(zarr.open_group(str(out / "s.zarr"), mode="r")["coords"][:])
    start = time.perf_counter()
    osr = openslide.OpenSlide(str(slide))
    level = osr.get_best_level_for_downsample(2.0 + 1e-6)
    for x, y in coords.tolist():
        osr.read_region((x, y), level, (128, 128))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "n": len(coords), "level": level}))
"""


def _tissue_field(size: int, seed: int) -> np.ndarray:
    """A (size, size) float field in [0, 1]: smooth blobs, > 0.5 is tissue (~45 % of the area)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 16, mode="wrap")
    field = (field - field.mean()) / field.std()
    return 1 / (1 + np.exp(-4 * (field - 0.1)))


def _tiles(width: int, field: np.ndarray, seed: int):
    """H&E-like 256 px tiles of one level, row-major, generated on the fly.

    Tissue texture: 16 precomputed tiles of eosin with nuclei-like blobs, blended over glass by
    the smooth tissue field (sampled at 1/8 resolution: cheap, and edges need not be sharp).
    """
    rng = np.random.default_rng(seed)
    glass = np.array([240, 238, 242], np.int16)
    eosin = np.array([225, 140, 190], np.int16)
    nuclei = np.array([90, 55, 140], np.int16)
    textures = []
    for _ in range(16):
        cells = np.kron(rng.random((64, 64)) < 0.25, np.ones((4, 4), bool))[..., None]
        texture = np.where(cells, nuclei, eosin) + rng.integers(-12, 13, (256, 256, 1))
        textures.append((texture - glass).astype(np.int16))
    scale = field.shape[0] / width  # field px per level px
    n = -(-width // 256)
    grid = (np.arange(32) * 8 + 4).astype(np.float32)
    for ty in range(n):
        for tx in range(n):
            yy, xx = np.meshgrid(
                (ty * 256 + grid) * scale, (tx * 256 + grid) * scale, indexing="ij"
            )
            alpha = ndimage.map_coordinates(field, [yy, xx], order=1, mode="nearest")
            alpha = np.clip(alpha * 2 - 1, 0, 1) * 256
            alpha = np.kron(alpha.astype(np.int16), np.ones((8, 8), np.int16))[..., None]
            rgb = glass + (textures[rng.integers(16)] * alpha >> 8)
            yield rgb.astype(np.uint8)


def write_large_slide(path: Path, size: int, seed: int = 0) -> None:
    """A JPEG pyramid (each level generated tile by tile, never held whole in memory)."""
    import tifffile

    field = _tissue_field(256, seed)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, downsample = size, 1
        while level >= 512:
            px_per_cm = 10000.0 / (SOURCE_MPP * downsample)
            tif.write(
                _tiles(level, field, seed + downsample),
                shape=(level, level, 3),
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=1 if downsample > 1 else 0,
                metadata=None,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
            )
            level, downsample = level // 2, downsample * 2


def write_demo_slide(path: Path, size: int = 2048, seed: int = 1) -> None:
    from stedm.data.tiff import write_pyramidal_tiff

    rgb = np.concatenate(list(_tiles(size, _tissue_field(64, seed), seed)), axis=0)
    n = size // 256
    rgb = rgb.reshape(n, n, 256, 256, 3).transpose(0, 2, 1, 3, 4).reshape(size, size, 3)
    write_pyramidal_tiff(path, rgb, SOURCE_MPP, n_levels=4)


def _child(mode: str, slide: Path, out: Path, chunk: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(slide), str(out), str(chunk)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(name: str, slide: Path, work: Path, chunk: int) -> dict:
    out = work / f"{slide.stem}-chunk{chunk}"
    out.mkdir(exist_ok=True)
    subprocess.run(
        ["cat", str(slide)], check=True, stdout=subprocess.DEVNULL
    )  # warm the page cache
    tiling, bare = [], []
    for _ in range(2):  # interleaved, so both see the same machine load
        tiling.append(_child("tile", slide, out, chunk))
        bare.append(_child("bare", slide, out, chunk))
    tile = min(tiling, key=lambda r: r["seconds"])
    base = min(bare, key=lambda r: r["seconds"])
    row = {
        "slide": name,
        "chunk_tiles": chunk,
        "tiles": tile["n"],
        "tile_slide_tiles_per_s": tile["n"] / tile["seconds"],
        "bare_read_region_tiles_per_s": base["n"] / base["seconds"],
        "peak_rss_mb": max(r["rss_mb"] for r in tiling),
        "rss_after_imports_mb": tile["rss_imports_mb"],
    }
    row["ratio"] = row["tile_slide_tiles_per_s"] / row["bare_read_region_tiles_per_s"]
    print(
        f"{name:<24} chunk_tiles={chunk:<3} tiles={row['tiles']:<6} "
        f"tile_slide {row['tile_slide_tiles_per_s']:7.0f} tiles/s   bare read_region "
        f"{row['bare_read_region_tiles_per_s']:7.0f} tiles/s   ratio {row['ratio']:.2f}   "
        f"peak RSS {row['peak_rss_mb']:.0f} MB (after imports {row['rss_after_imports_mb']:.0f} MB)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20480, help="large slide edge in px")
    parser.add_argument("--keep", type=Path, help="keep generated slides and stores in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stedm-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        demo, large = work / "demo.tiff", work / f"large{args.size}.tiff"
        if not demo.exists():
            write_demo_slide(demo)
        if not large.exists():
            start = time.perf_counter()
            write_large_slide(large, args.size)
            print(
                f"generated {large.name}: {args.size}x{args.size} px, {large.stat().st_size / 1e6:.0f} MB "
                f"JPEG, in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        print(
            f"tiling at {MPP} µm/px, {TILE} px tiles, source {SOURCE_MPP} µm/px (exact pyramid level)"
        )
        rows = [measure("demo 2048 px", demo, work, 1)]
        rows += [measure(f"large {args.size} px", large, work, chunk) for chunk in (1, 16)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
