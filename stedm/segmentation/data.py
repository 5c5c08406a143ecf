"""Segmentation training and validation data: real tiles, synthetic tiles, and their mix.

Training items are pure functions of `(seed, i)` (like the diffusion datasets), with `i` the
global sample counter the shared training loop feeds in (`CounterSampler`). The loop's batch k is
items k·B … k·B + B − 1, so the position in the batch is `i % B`, and the mix is decided by it:
positions below `n_synthetic(f, B)` = round(f·B) draw a synthetic tile, the others a real one.
Every batch therefore holds exactly round(f·B) synthetic tiles (the paper's real:synthetic 1:4 at
f = 0.8), also after a resumption, with no sampler state to save.

- Real tiles: tiles of the budget's slides with at least one annotated pixel, drawn 50/50 from
  tiles with and without foreground when both exist (the official sampler), with a random
  flip/rotation (same on image and label) and, for stain-augmentation arms, HED jitter.
- Synthetic tiles: uniform over the budget's synthetic store (`images`, `labels`), random
  flip/rotation. Synthetic tiles are never stain-jittered: their colours are the point.

Targets: `binary` = 1 where the label is a foreground class, 0 elsewhere; `classes` = the label.
Pixels equal to `ignore_index` stay `ignore_index` (both losses skip them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from stedm.data.stain import hed_jitter
from stedm.diffusion.data import _StoreReader, dihedral, random_dihedral, to_model_image
from stedm.errors import StedmError

SYNTHETIC = "__synthetic__"  # reader key of the synthetic store


def n_synthetic(fraction: float, batch_size: int) -> int:
    """Synthetic tiles per batch: round(fraction · batch_size), halves rounded up."""
    if not 0.0 <= fraction <= 1.0:
        raise StedmError(f"synthetic_fraction must be in [0, 1], got {fraction}")
    return min(batch_size, int(math.floor(fraction * batch_size + 0.5)))


def make_target(label: np.ndarray, target: str, foreground: Sequence[int], n_classes: int,
                ignore_index: int) -> np.ndarray:
    """Training target (int64) from a label tile: binary foreground or class indices."""
    label = np.asarray(label)
    valid = label != ignore_index
    if target == "binary":
        out = np.isin(label, np.asarray(foreground, dtype=label.dtype)).astype(np.int64)
    elif target == "classes":
        if (valid & (label >= n_classes)).any():
            raise StedmError(
                f"label values {sorted(set(label[valid & (label >= n_classes)].tolist()))} exceed the "
                f"{n_classes} configured classes; labels.classes must match the tiles' classes"
            )
        out = label.astype(np.int64)
    else:
        raise StedmError(f"config key 'segmentation.target': {target!r} is not one of ['binary', 'classes']")
    out[~valid] = ignore_index
    return out


def _scan(labels: Any, foreground: Sequence[int], ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile of a (N, T, T) label array: any annotated pixel, any foreground pixel."""
    annotated, has_fg = [np.zeros(0, bool)], [np.zeros(0, bool)]
    fg = np.asarray(foreground, dtype=np.uint8)
    for start in range(0, labels.shape[0], 256):
        block = np.asarray(labels[start : start + 256]).reshape(-1, labels.shape[1] * labels.shape[2])
        annotated.append((block != ignore_index).any(axis=1))
        has_fg.append(np.isin(block, fg).any(axis=1))
    return np.concatenate(annotated), np.concatenate(has_fg)


def _open(path: Path, what: str) -> zarr.Group:
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError) as exc:
        raise StedmError(f"{what} {path} cannot be opened ({exc})") from exc
    if "images" not in group or "labels" not in group:
        raise StedmError(f"{what} {path} needs 'images' and 'labels' arrays (annotated tiles)")
    return group


class SegTrainDataset(Dataset):
    """Mixed real/synthetic training items; item i is a pure function of (seed, i).

    Items: image (3, T, T) float32 in [-1, 1], target (T, T) int64, synthetic (bool tensor),
    slide_id (str, the synthetic store's items say "__synthetic__"), tile_index (int).
    """

    def __init__(
        self,
        real_stores: Sequence[str | Path],
        *,
        foreground: Sequence[int],
        n_classes: int,
        batch_size: int,
        num_samples: int,
        target: str = "binary",
        ignore_index: int = 255,
        synthetic_store: str | Path | None = None,
        synthetic_fraction: float = 0.0,
        stain_augmentation: bool = False,
        seed: int = 0,
        balance_foreground: bool = True,
        cache_limit_mb: float = 512.0,
    ):
        self.batch_size, self.num_samples, self.seed = int(batch_size), int(num_samples), int(seed)
        self.n_synthetic = n_synthetic(synthetic_fraction, self.batch_size) if synthetic_fraction > 0 else 0
        if self.n_synthetic and synthetic_store is None:
            raise StedmError(f"synthetic_fraction {synthetic_fraction} needs a synthetic store (--synthetic)")
        self.target, self.foreground = target, tuple(int(c) for c in foreground)
        self.n_classes, self.ignore_index = int(n_classes), int(ignore_index)
        self.stain_augmentation, self.balance_foreground = bool(stain_augmentation), bool(balance_foreground)
        paths: dict[str, Path] = {}
        sizes, nbytes = set(), 0
        pool_slide, pool_tile, pool_fg = [], [], []
        self._slide_ids: list[str] = []
        for path in map(Path, real_stores):
            group = _open(path, "tile store")
            stored = group.attrs.get("ignore_index")
            if stored is not None and int(stored) != self.ignore_index:
                raise StedmError(f"tile store {path} uses ignore_index {stored}, the config says "
                                 f"{self.ignore_index}; retile or fix labels.ignore_index")
            slide_id = str(group.attrs.get("slide_id", path.stem))
            annotated, has_fg = _scan(group["labels"], self.foreground, self.ignore_index)
            keep = np.flatnonzero(annotated)
            pool_slide.append(np.full(keep.size, len(self._slide_ids)))
            pool_tile.append(keep)
            pool_fg.append(has_fg[keep])
            self._slide_ids.append(slide_id)
            paths[slide_id] = path
            sizes.add(int(group["images"].shape[1]))
            nbytes += group["images"].nbytes + group["labels"].nbytes
        self._pool_slide = np.concatenate(pool_slide) if pool_slide else np.zeros(0, np.int64)
        self._pool_tile = np.concatenate(pool_tile) if pool_tile else np.zeros(0, np.int64)
        fg = np.concatenate(pool_fg) if pool_fg else np.zeros(0, bool)
        self._fg_rows, self._bg_rows = np.flatnonzero(fg), np.flatnonzero(~fg)
        if self.n_synthetic < self.batch_size and self._pool_tile.size == 0:
            raise StedmError("no annotated tiles in the budget's tile stores to train the segmentation on")
        self.n_synthetic_tiles = 0
        if self.n_synthetic:
            group = _open(Path(synthetic_store), "synthetic store")
            self.n_synthetic_tiles = int(group["images"].shape[0])
            if self.n_synthetic_tiles == 0:
                raise StedmError(f"synthetic store {synthetic_store} holds no tiles; rerun the synthesis stage")
            paths[SYNTHETIC] = Path(synthetic_store)
            sizes.add(int(group["images"].shape[1]))
            nbytes += group["images"].nbytes + group["labels"].nbytes
        if len(sizes) > 1:
            raise StedmError(f"real and synthetic tiles differ in size {sorted(sizes)}; they must match")
        self.tile_size = sizes.pop() if sizes else 0
        self.reader = _StoreReader(paths, cache=nbytes < cache_limit_mb * 2**20)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def n_real_tiles(self) -> int:
        """Real tiles in the pool (tiles with at least one annotated pixel)."""
        return int(self._pool_tile.size)

    def is_synthetic(self, i: int) -> bool:
        """Whether sample counter i is a synthetic draw (its position in its batch)."""
        return (i % self.batch_size) < self.n_synthetic

    def _pick_real(self, rng: np.random.Generator) -> tuple[str, int]:
        if self.balance_foreground and self._fg_rows.size and self._bg_rows.size:
            rows = self._fg_rows if rng.random() < 0.5 else self._bg_rows
            row = int(rows[rng.integers(rows.size)])
        else:
            row = int(rng.integers(self._pool_tile.size))
        return self._slide_ids[self._pool_slide[row]], int(self._pool_tile[row])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            raise IndexError(f"sample counter must be >= 0, got {i}")
        rng = np.random.default_rng([self.seed, int(i)])
        synthetic = self.is_synthetic(i)
        if synthetic:
            slide_id, tile = SYNTHETIC, int(rng.integers(self.n_synthetic_tiles))
        else:
            slide_id, tile = self._pick_real(rng)
        image, label = self.reader.image(slide_id, tile), self.reader.label(slide_id, tile)
        k, flip = random_dihedral(rng)
        if self.stain_augmentation and not synthetic:
            image = hed_jitter(image, rng)
        target = make_target(dihedral(label, k, flip), self.target, self.foreground, self.n_classes,
                             self.ignore_index)
        return {
            "image": to_model_image(dihedral(image, k, flip)),
            "target": torch.from_numpy(target),
            "synthetic": torch.tensor(synthetic),
            "slide_id": slide_id,
            "tile_index": tile,
        }


class ValidationTiles:
    """The annotated tiles of the validation slides, served in fixed-order batches.

    Loaded into memory once when small (demo: a few MB), otherwise read from the stores on
    every pass. Batches: (images (n, 3, T, T) float32 in [-1, 1], targets (n, T, T) int64).
    """

    def __init__(self, stores: Sequence[str | Path], *, target: str, foreground: Sequence[int],
                 n_classes: int, ignore_index: int = 255, cache_limit_mb: float = 256.0):
        self.target, self.foreground = target, tuple(foreground)
        self.n_classes, self.ignore_index = n_classes, ignore_index
        self.items: list[tuple[Path, np.ndarray]] = []
        nbytes = 0
        for path in map(Path, stores):
            group = _open(path, "validation tile store")
            annotated, _ = _scan(group["labels"], self.foreground, ignore_index)
            keep = np.flatnonzero(annotated)
            if keep.size:
                self.items.append((path, keep))
                nbytes += keep.size * group["images"].shape[1] ** 2 * 4
        self.n_tiles = int(sum(k.size for _, k in self.items))
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if nbytes < cache_limit_mb * 2**20:
            self._cache = [self._read(path, keep) for path, keep in self.items]

    @staticmethod
    def _read(path: Path, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        group = zarr.open_group(str(path), mode="r")
        return (np.asarray(group["images"].get_orthogonal_selection((keep,))),
                np.asarray(group["labels"].get_orthogonal_selection((keep,))))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for n, (path, keep) in enumerate(self.items):
            for start in range(0, keep.size, batch_size):
                if self._cache is not None:
                    images, labels = (a[start : start + batch_size] for a in self._cache[n])
                else:
                    images, labels = self._read(path, keep[start : start + batch_size])
                x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                y = make_target(labels, self.target, self.foreground, self.n_classes, self.ignore_index)
                yield x, torch.from_numpy(y)
