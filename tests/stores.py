"""Small tile stores in the docs/contracts.md format, for tests of stages downstream of tiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

CLASSES = ["Background", "Stroma", "Tumor"]


def write_store(path: Path, slide_id: str, n: int = 12, tile: int = 32, seed: int = 0,
                labels: bool = True, tile_l0: float = 64.0) -> Path:
    """Random-texture tiles on a 4-wide grid; label = Tumor where the red channel is high."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (n, 1, 1, 3))
    images = np.clip(base + rng.normal(0, 25, (n, tile, tile, 3)), 0, 255).astype(np.uint8)
    coords = np.asarray([((k % 4) * tile_l0, (k // 4) * tile_l0) for k in range(n)], np.int64)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(1, tile, tile, 3))
    if labels:
        group.create_array("labels", data=np.where(images[..., 0] > 130, 2, 1).astype(np.uint8),
                           chunks=(1, tile, tile))
    group.create_array("coords", data=coords)
    group.create_array("tissue", data=np.ones(n, np.float32))
    group.attrs.update({
        "slide_id": slide_id, "patient_id": slide_id, "mpp": 1.0, "source_mpp": 0.5,
        "tile_size": tile, "tile_size_level0": tile_l0, "annotated": labels,
        "class_names": CLASSES, "ignore_index": 255, "n_tiles": n,
    })
    return path
