"""Training data for the diffusion stage: (content tile, layout, style set) items from tile stores.

Every item is a pure function of `(seed, i)`: `__getitem__(i)` seeds its own generator with
`np.random.default_rng([seed, i])`, picks a content tile, augments it and draws its style set. So
an item is the same in any worker process and after a resumption, and `i` is meant as a *global*
sample counter (any i >= 0 is valid, not only i < len): feed `CounterSampler(start, stop)` to the
DataLoader to continue a run where it stopped. `len()` is the configured `num_samples`, like the
paper's "epoch" of 10,000 randomly drawn patches.

Pixel data is read lazily from the zarr stores, once opened per worker process. When all stores
together are smaller than `cache_limit_mb`, each worker loads them whole into memory on first use
(demo stores are a few MB; one array read beats thousands of per-tile chunk reads).

Intensities follow the official code: uint8 -> [-1, 1]; a dropped style set is the constant -2
image (the model maps it to its null style); the layout is never dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from stedm.diffusion.style_sampling import TileIndex, make_style_sampler
from stedm.errors import StedmError

if TYPE_CHECKING:
    from stedm.config import Config

NULL_STYLE_VALUE = -2.0  # the paper's dropped-style image: (0 - 0.5) * 2 after the [-1, 1] rescale
LAYOUT_MODES = ("binary", "classes")


# --------------------------------------------------------------------------- layout and augmentation
def layout_channels(mode: str, n_classes: int) -> int:
    """Channels of the layout condition: 2 for `binary`, one per class for `classes`."""
    if mode not in LAYOUT_MODES:
        raise StedmError(f"config key 'stedm.layout': {mode!r} is not one of {list(LAYOUT_MODES)}")
    return 2 if mode == "binary" else int(n_classes)


def layout_onehot(
    label: np.ndarray,
    mode: str,
    foreground_indices: Sequence[int],
    n_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """One-hot layout (C, T, T) float32 from a label tile (T, T) of class indices.

    `binary` = [background, any foreground class] (the official code collapses its classes the
    same way: the generator sees tumour vs. rest); every non-foreground class counts as background.
    `classes` = one channel per class. Pixels equal to `ignore_index` are zero in every channel.
    """
    channels = layout_channels(mode, n_classes)
    label = np.asarray(label)
    valid = label != ignore_index
    if (valid & (label >= n_classes)).any():
        bad = sorted(set(np.unique(label[valid & (label >= n_classes)]).tolist()))
        raise StedmError(
            f"label values {bad} exceed the {n_classes} configured classes; "
            "labels.classes must match the classes the tiles were rasterised with"
        )
    if mode == "binary":
        fg = np.isin(label, np.asarray(foreground_indices, dtype=label.dtype)) & valid
        out = np.stack([valid & ~fg, fg])
    else:
        out = (label[None] == np.arange(channels, dtype=label.dtype)[:, None, None]) & valid
    return out.astype(np.float32)


def random_dihedral(rng: np.random.Generator) -> tuple[int, bool]:
    """One of the 8 flips/rotations of a square: (number of 90° turns, mirror first)."""
    return int(rng.integers(4)), bool(rng.integers(2))


def dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Apply a flip (over the x axis) then `k` 90° rotations to the first two (spatial) axes."""
    if flip:
        array = array[:, ::-1]
    return np.ascontiguousarray(np.rot90(array, k, axes=(0, 1)))


def to_model_image(tile: np.ndarray) -> torch.Tensor:
    """(T, T, 3) uint8 -> (3, T, T) float32 in [-1, 1]."""
    return (
        torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))
        .float()
        .div_(127.5)
        .sub_(1.0)
    )


# --------------------------------------------------------------------------- store access
class _StoreReader:
    """Per-process lazy access to the `images`/`labels` arrays of several stores."""

    def __init__(self, paths: dict[str, Path], cache: bool):
        self.paths = paths
        self.cache = cache
        self._pid: int | None = None
        self._arrays: dict[tuple[str, str], Any] = {}
        self._cached: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # open zarr handles and cached pixels stay behind: each worker opens/loads its own
        return {
            "paths": self.paths,
            "cache": self.cache,
            "_pid": None,
            "_arrays": {},
            "_cached": {},
        }

    def _array(self, slide_id: str, name: str) -> Any:
        if (
            self._pid != os.getpid()
        ):  # forked worker: reopen handles (cached numpy is fine to share)
            self._pid, self._arrays = os.getpid(), {}
        key = (slide_id, name)
        if key in self._cached:
            return self._cached[key]
        if key not in self._arrays:
            self._arrays[key] = zarr.open_group(str(self.paths[slide_id]), mode="r")[name]
        if self.cache:
            self._cached[key] = np.asarray(self._arrays[key][:])
            return self._cached[key]
        return self._arrays[key]

    def image(self, slide_id: str, index: int) -> np.ndarray:
        return np.asarray(self._array(slide_id, "images")[index])

    def label(self, slide_id: str, index: int) -> np.ndarray:
        return np.asarray(self._array(slide_id, "labels")[index])


def _store_info(paths: Sequence[Path], need_labels: bool) -> tuple[int, int]:
    """(tile size, total bytes of the arrays the dataset reads) over all stores; checks they agree."""
    sizes, total = set(), 0
    for path in paths:
        group = zarr.open_group(str(path), mode="r")
        if "images" not in group:
            raise StedmError(f"tile store {path} has no 'images' array; rerun the tiling stage")
        images = group["images"]
        sizes.add(int(images.shape[1]))
        total += images.nbytes + (group["labels"].nbytes if need_labels else 0)
    if len(sizes) > 1:
        raise StedmError(
            f"tile stores have different tile sizes {sorted(sizes)}; retile them alike"
        )
    return (sizes.pop() if sizes else 0), total


class CounterSampler(Sampler[int]):
    """Yields the global sample counters start, start + 1, ..., stop - 1 (no shuffling needed:
    each item already draws its content tile at random). Resume with start = samples seen so far."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _rng(seed: int, i: int) -> np.random.Generator:
    if i < 0:
        raise IndexError(f"sample counter must be >= 0, got {i}")
    return np.random.default_rng([int(seed), int(i)])


# --------------------------------------------------------------------------- autoencoder data
class AutoencoderTileDataset(Dataset):
    """Random tiles (with random flips/rot90) of any stores; item i is a pure function of (seed, i).

    Items: {"image": (3, T, T) float32 in [-1, 1], "slide_id": str, "tile_index": int}.
    """

    def __init__(
        self,
        stores: Sequence[str | Path],
        *,
        num_samples: int,
        seed: int = 0,
        cache_limit_mb: float = 512.0,
    ):
        self.index = TileIndex(list(stores))
        self.tile_size, nbytes = _store_info([s.path for s in self.index.slides.values()], False)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self._slides = [sid for sid, s in self.index.slides.items() for _ in range(s.n)]
        self._tiles = np.concatenate(
            [np.arange(s.n) for s in self.index.slides.values()] or [np.zeros(0, np.int64)]
        )
        if not self._slides:
            raise StedmError("no tiles in the given tile stores to train the autoencoder on")
        paths = {sid: s.path for sid, s in self.index.slides.items()}
        self.reader = _StoreReader(paths, cache=nbytes < cache_limit_mb * 2**20)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = _rng(self.seed, i)
        j = int(rng.integers(len(self._slides)))
        slide_id, tile = self._slides[j], int(self._tiles[j])
        image = dihedral(self.reader.image(slide_id, tile), *random_dihedral(rng))
        return {"image": to_model_image(image), "slide_id": slide_id, "tile_index": tile}


# --------------------------------------------------------------------------- STEDM training data
class StedmTrainDataset(Dataset):
    """Content tile + layout + style set items over the annotated tiles of the budget's slides.

    Items (fixed shapes, so the default collate works):
        image: (3, T, T) float32 in [-1, 1], the augmented content tile.
        layout: (C, T, T) float32 one-hot of its label tile, same flip/rotation as `image`.
        style: (n, 3, T, T) float32 in [-1, 1], each tile flipped/rotated independently; all -2
            when the set is dropped. n = `n_style` for multi_patch, 1 otherwise (also for `none`).
        style_dropped: bool tensor, True when `style` is the null style (always for `none`).
        style_tiles: (n,) int64 tile indices of the style tiles in the content slide, -1 if dropped.
        slide_id, tile_index: where the content tile comes from.

    Content tiles are the tiles with at least one annotated (non-ignore) pixel. With
    `balance_foreground` (the official sampler's 50/50 background/foreground draw), half the items
    come from tiles containing a foreground class and half from tiles without; if one group is
    empty, tiles are drawn uniformly. Tiles are pooled over slides, so larger slides give more.
    """

    def __init__(
        self,
        stores: Sequence[str | Path],
        *,
        sampling: str,
        n_style: int,
        nearby_distance_um: float,
        style_dropout: float,
        foreground_indices: Sequence[int],
        n_classes: int,
        layout: str = "binary",
        ignore_index: int = 255,
        num_samples: int = 10_000,
        seed: int = 0,
        balance_foreground: bool = True,
        cache_limit_mb: float = 512.0,
    ):
        if not 0.0 <= style_dropout <= 1.0:
            raise StedmError(
                f"config key 'stedm.style_dropout': must be in [0, 1], got {style_dropout}"
            )
        self.index = TileIndex(list(stores))
        unlabelled = [
            f"{s.slide_id} ({s.path})" for s in self.index.slides.values() if not s.has_labels
        ]
        if unlabelled:
            raise StedmError(
                f"slides without labels cannot train STEDM: {', '.join(unlabelled)}; "
                "only annotated slides belong in a budget (check splits.json and the manifest's "
                "annotation_path)"
            )
        self.sampler = make_style_sampler(sampling, self.index, n_style, nearby_distance_um)
        self.sampling, self.style_dropout = sampling, float(style_dropout)
        self.layout, self.n_classes = layout, int(n_classes)
        self.layout_channels = layout_channels(layout, n_classes)
        self.foreground_indices = tuple(int(c) for c in foreground_indices)
        self.ignore_index = int(ignore_index)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.balance_foreground = bool(balance_foreground)
        self.set_size = max(self.sampler.set_size, 1)

        slides = list(self.index.slides.values())
        self.tile_size, nbytes = _store_info([s.path for s in slides], True)
        self._slide_ids = [s.slide_id for s in slides]
        pool_slide, pool_tile, pool_fg = [], [], []
        for k, slide in enumerate(slides):
            annotated, has_fg = self._scan_labels(slide.path)
            keep = np.flatnonzero(annotated)
            pool_slide.append(np.full(keep.size, k, dtype=np.int64))
            pool_tile.append(keep.astype(np.int64))
            pool_fg.append(has_fg[keep])
        self._pool_slide = np.concatenate(pool_slide) if pool_slide else np.zeros(0, np.int64)
        self._pool_tile = np.concatenate(pool_tile) if pool_tile else np.zeros(0, np.int64)
        fg = np.concatenate(pool_fg) if pool_fg else np.zeros(0, bool)
        if self._pool_tile.size == 0:
            raise StedmError("no annotated tiles in the given tile stores to train STEDM on")
        self._fg_rows, self._bg_rows = np.flatnonzero(fg), np.flatnonzero(~fg)
        self.reader = _StoreReader(
            {s.slide_id: s.path for s in slides}, cache=nbytes < cache_limit_mb * 2**20
        )

    @classmethod
    def from_config(
        cls, stores: Sequence[str | Path], config: Config, *, num_samples: int, **overrides: Any
    ) -> StedmTrainDataset:
        """Build from the `labels` and `stedm` config sections (seed = `config.seed`)."""
        kwargs: dict[str, Any] = dict(
            sampling=config.stedm.style_sampling,
            n_style=config.stedm.n_style,
            nearby_distance_um=config.stedm.nearby_distance_um,
            style_dropout=config.stedm.style_dropout,
            foreground_indices=config.labels.foreground_indices,
            n_classes=len(config.labels.classes),
            layout=config.stedm.layout,
            ignore_index=config.labels.ignore_index,
            num_samples=num_samples,
            seed=config.seed,
        )
        kwargs.update(overrides)
        return cls(stores, **kwargs)

    def _scan_labels(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Per tile: any annotated pixel, any foreground pixel (read in blocks of tiles)."""
        group = zarr.open_group(str(path), mode="r")
        stored_ignore = group.attrs.get("ignore_index")
        if stored_ignore is not None and int(stored_ignore) != self.ignore_index:
            raise StedmError(
                f"tile store {path} uses ignore_index {stored_ignore}, the config "
                f"labels.ignore_index is {self.ignore_index}; retile or fix the config"
            )
        labels = group["labels"]
        annotated, has_fg = [], []
        fg = np.asarray(self.foreground_indices, dtype=np.uint8)
        for start in range(0, labels.shape[0], 256):
            block = np.asarray(labels[start : start + 256]).reshape(
                -1, labels.shape[1] * labels.shape[2]
            )
            annotated.append((block != self.ignore_index).any(axis=1))
            has_fg.append(np.isin(block, fg).any(axis=1))
        if not annotated:
            return np.zeros(0, bool), np.zeros(0, bool)
        return np.concatenate(annotated), np.concatenate(has_fg)

    def __len__(self) -> int:
        return self.num_samples

    def _pick_content(self, rng: np.random.Generator) -> int:
        """Row of the content pool: 50/50 foreground/background groups, or uniform."""
        if self.balance_foreground and self._fg_rows.size and self._bg_rows.size:
            rows = self._fg_rows if rng.random() < 0.5 else self._bg_rows
            return int(rows[rng.integers(rows.size)])
        return int(rng.integers(self._pool_tile.size))

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = _rng(self.seed, i)
        row = self._pick_content(rng)
        slide_id, tile = self._slide_ids[self._pool_slide[row]], int(self._pool_tile[row])

        # content image and its layout get the SAME flip/rotation
        k, flip = random_dihedral(rng)
        image = dihedral(self.reader.image(slide_id, tile), k, flip)
        label = dihedral(self.reader.label(slide_id, tile), k, flip)
        layout = layout_onehot(
            label, self.layout, self.foreground_indices, self.n_classes, self.ignore_index
        )

        dropped = self.sampling == "none" or bool(rng.random() < self.style_dropout)
        t = self.tile_size
        if dropped:
            style = torch.full((self.set_size, 3, t, t), NULL_STYLE_VALUE, dtype=torch.float32)
            style_tiles = torch.full((self.set_size,), -1, dtype=torch.int64)
        else:
            refs = self.sampler.sample(rng, slide_id, tile)
            # every style tile (also `augmented`'s copy of the content) is augmented independently
            style = torch.stack(
                [
                    to_model_image(dihedral(self.reader.image(sid, j), *random_dihedral(rng)))
                    for sid, j in refs
                ]
            )
            style_tiles = torch.tensor([j for _, j in refs], dtype=torch.int64)
        return {
            "image": to_model_image(image),
            "layout": torch.from_numpy(layout),
            "style": style,
            "style_dropped": torch.tensor(dropped),
            "style_tiles": style_tiles,
            "slide_id": slide_id,
            "tile_index": tile,
        }
