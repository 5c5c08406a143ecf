"""Style sampling: which tiles form the style set of a content tile (STEDM §3).

A style set is a list of tile *references* `(slide_id, tile_index)` into the tile stores, never
pixels, so the training dataset and the generation-time style-query table share one code path.
`TileIndex` holds only the coordinates and attributes of every slide (no images), and the samplers
draw from it:

| strategy      | training (content tile given)                  | generation (`sample_from_slide`)          |
|---------------|------------------------------------------------|-------------------------------------------|
| `none`        | empty set (the model uses the null style)      | empty set                                 |
| `nearby`      | 1 tile whose centre is within `nearby_distance_um` of the content tile's centre | 1 neighbour of a random tile of the slide |
| `multi_patch` | `n` distinct random tiles of the same slide    | `n` distinct random tiles of the slide    |
| `augmented`   | the content tile itself (re-augmented later)   | 1 random tile of the slide                |

Differences from the official code, on purpose: `nearby` there jitters the crop centre by up to
±1 patch width per axis and may leave the tissue; here it picks an existing tissue tile within a
Euclidean radius (we work on pre-extracted tiles, not on WSIs). `multi_patch` always draws from
the content tile's own slide (the official HER2/CATCH code could use another WSI's grid, §10 B3).
Every tile of a store is a tissue tile (the tiler keeps only those), so "random tissue tile" means
"random tile of the store".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import zarr
from scipy.spatial import cKDTree

from stedm.errors import StedmError

STRATEGIES = ("none", "nearby", "multi_patch", "augmented")

TileRef = tuple[str, int]


@dataclass(frozen=True, eq=False)
class SlideTiles:
    """Tile geometry of one slide's store (no pixel data)."""

    slide_id: str
    path: Path
    coords: np.ndarray  # (N, 2) int64, level-0 (x, y) of each tile's top-left corner
    tile_size_level0: float  # level-0 px spanned by one tile
    source_mpp: float  # level-0 µm/px
    tissue: np.ndarray  # (N,) float32 tissue fraction
    has_labels: bool = False

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def centres(self) -> np.ndarray:
        """(N, 2) float64 level-0 centres of the tiles."""
        return self.coords.astype(np.float64) + self.tile_size_level0 / 2.0


@dataclass(frozen=True, eq=False)
class Neighbours:
    """Neighbour lists in CSR form: tile i's candidates are `indices[indptr[i]:indptr[i + 1]]`."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (nnz,) int64

    def of(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]


def _read_slide(path: Path) -> SlideTiles:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing/broken store
        raise StedmError(f"cannot open tile store {path}: {exc}; rerun the tiling stage") from exc
    attrs = dict(group.attrs)
    missing = [k for k in ("tile_size_level0", "source_mpp") if k not in attrs]
    if missing or "coords" not in group:
        what = ", ".join(
            [f"attribute {k!r}" for k in missing]
            + ([] if "coords" in group else ["array 'coords'"])
        )
        raise StedmError(f"tile store {path} lacks {what}; rerun the tiling stage")
    coords = np.asarray(group["coords"][:], dtype=np.int64).reshape(-1, 2)
    tissue = (
        np.asarray(group["tissue"][:], dtype=np.float32)
        if "tissue" in group
        else np.ones(len(coords), dtype=np.float32)
    )
    slide_id = str(attrs.get("slide_id") or Path(path).name.removesuffix(".zarr"))
    return SlideTiles(
        slide_id=slide_id,
        path=Path(path),
        coords=coords,
        tile_size_level0=float(attrs["tile_size_level0"]),
        source_mpp=float(attrs["source_mpp"]),
        tissue=tissue,
        has_labels="labels" in group,
    )


class TileIndex:
    """Coordinates and attributes of every tile of a set of slide stores, keyed by slide id.

    Only `coords`, `tissue` and the group attributes are read; pixel data stays on disk.
    """

    def __init__(self, stores: list[Path] | list[str]):
        self.slides: dict[str, SlideTiles] = {}
        self._neighbours: dict[tuple[str, float], Neighbours] = {}
        for path in stores:
            slide = _read_slide(Path(path))
            if slide.slide_id in self.slides:
                raise StedmError(
                    f"slide id {slide.slide_id!r} appears twice ({self.slides[slide.slide_id].path} "
                    f"and {path}); pass each tile store once"
                )
            self.slides[slide.slide_id] = slide

    def __getitem__(self, slide_id: str) -> SlideTiles:
        try:
            return self.slides[slide_id]
        except KeyError:
            raise StedmError(f"slide {slide_id!r} is not in the style tile index") from None

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.slides

    @property
    def slide_ids(self) -> list[str]:
        return list(self.slides)

    def neighbours(self, slide_id: str, distance_um: float) -> Neighbours:
        """Tiles whose centres lie within `distance_um` of each tile's centre (cached).

        The tile itself is left out of its own list whenever another tile is in range; a tile with
        no other tile in range (e.g. the only tile of a slide) lists only itself, so `nearby` then
        falls back to the content tile (its style is still that slide's style).
        """
        key = (slide_id, float(distance_um))
        if key not in self._neighbours:
            slide = self._nonempty(slide_id)
            radius_px = float(distance_um) / slide.source_mpp
            centres = slide.centres
            lists = cKDTree(centres).query_ball_point(centres, r=radius_px)
            indptr = np.zeros(slide.n + 1, dtype=np.int64)
            chunks = []
            for i, found in enumerate(lists):
                others = np.asarray(sorted(j for j in found if j != i), dtype=np.int64)
                chunk = others if others.size else np.asarray([i], dtype=np.int64)
                chunks.append(chunk)
                indptr[i + 1] = indptr[i] + chunk.size
            self._neighbours[key] = Neighbours(indptr=indptr, indices=np.concatenate(chunks))
        return self._neighbours[key]

    def _nonempty(self, slide_id: str) -> SlideTiles:
        slide = self[slide_id]
        if slide.n == 0:
            raise StedmError(
                f"slide {slide_id!r} ({slide.path}) has no tissue tiles to sample style from"
            )
        return slide

    def random_tiles(self, rng: np.random.Generator, slide_id: str, n: int) -> list[TileRef]:
        """`n` distinct random tiles of a slide.

        With fewer than `n` tiles every tile is used once and the rest are drawn with replacement,
        so the set keeps its fixed size `n` (the aggregator expects a fixed-size set).
        """
        slide = self._nonempty(slide_id)
        if slide.n >= n:
            chosen = rng.choice(slide.n, size=n, replace=False)
        else:
            chosen = np.concatenate(
                [rng.permutation(slide.n), rng.integers(0, slide.n, n - slide.n)]
            )
        return [(slide_id, int(i)) for i in chosen]

    def random_neighbour(
        self, rng: np.random.Generator, slide_id: str, tile_index: int, distance_um: float
    ) -> TileRef:
        """One random tile within `distance_um` of `tile_index` (itself only if nothing else is)."""
        slide = self._nonempty(slide_id)
        if not 0 <= tile_index < slide.n:
            raise StedmError(
                f"tile {tile_index} out of range for slide {slide_id!r} ({slide.n} tiles)"
            )
        candidates = self.neighbours(slide_id, distance_um).of(tile_index)
        return (slide_id, int(candidates[rng.integers(candidates.size)]))

    def sample_from_slide(
        self,
        rng: np.random.Generator,
        slide_id: str,
        strategy: str,
        n: int,
        nearby_distance_um: float = 256.0,
    ) -> list[TileRef]:
        """Generation-time style set from one (typically unseen) slide, no content tile needed.

        `nearby`: one neighbour of a random tile of the slide (an anchor location, like the content
        tile at training); `multi_patch`: `n` distinct random tiles; `augmented`: one random tile
        (the official code also takes another image at generation); `none`: empty.
        """
        _check_strategy(strategy)
        if strategy == "none":
            return []
        slide = self._nonempty(slide_id)
        if strategy == "multi_patch":
            return self.random_tiles(rng, slide_id, n)
        anchor = int(rng.integers(slide.n))
        if strategy == "nearby":
            return [self.random_neighbour(rng, slide_id, anchor, nearby_distance_um)]
        return [(slide_id, anchor)]


def _check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise StedmError(f"unknown style sampling {name!r}; allowed: {', '.join(STRATEGIES)}")


class StyleSampler(Protocol):
    """Draws the style set of a content tile as tile references."""

    name: str
    set_size: int  # tiles per style set (0 for `none`)

    def sample(
        self, rng: np.random.Generator, slide_id: str, content_index: int
    ) -> list[TileRef]: ...

    def sample_from_slide(self, rng: np.random.Generator, slide_id: str) -> list[TileRef]: ...


class NoStyleSampler:
    """`none`: no style images; the model uses its null style (a layout-only LDM)."""

    name = "none"
    set_size = 0

    def __init__(self, index: TileIndex):
        self.index = index

    def sample(self, rng: np.random.Generator, slide_id: str, content_index: int) -> list[TileRef]:
        return []

    def sample_from_slide(self, rng: np.random.Generator, slide_id: str) -> list[TileRef]:
        return []


class NearbySampler:
    """`nearby`: one tile of the same slide within `distance_um` (centre to centre) of the content.

    Neighbour lists are built once per slide with a k-d tree, so each draw is O(1).
    """

    name = "nearby"
    set_size = 1

    def __init__(self, index: TileIndex, distance_um: float):
        if distance_um <= 0:
            raise StedmError(
                f"config key 'stedm.nearby_distance_um': must be > 0, got {distance_um}"
            )
        self.index = index
        self.distance_um = float(distance_um)
        for slide_id, slide in index.slides.items():
            if slide.n:
                index.neighbours(slide_id, self.distance_um)

    def sample(self, rng: np.random.Generator, slide_id: str, content_index: int) -> list[TileRef]:
        return [self.index.random_neighbour(rng, slide_id, content_index, self.distance_um)]

    def sample_from_slide(self, rng: np.random.Generator, slide_id: str) -> list[TileRef]:
        return self.index.sample_from_slide(rng, slide_id, "nearby", 1, self.distance_um)


class MultiPatchSampler:
    """`multi_patch`: `n` distinct random tiles of the content tile's slide (paper: n = 10).

    The content tile itself may be among them, as in the official code's random grid cells.
    """

    name = "multi_patch"

    def __init__(self, index: TileIndex, n: int):
        if n < 1:
            raise StedmError(f"config key 'stedm.n_style': must be >= 1, got {n}")
        self.index = index
        self.set_size = int(n)

    def sample(self, rng: np.random.Generator, slide_id: str, content_index: int) -> list[TileRef]:
        return self.index.random_tiles(rng, slide_id, self.set_size)

    def sample_from_slide(self, rng: np.random.Generator, slide_id: str) -> list[TileRef]:
        return self.index.random_tiles(rng, slide_id, self.set_size)


class AugmentedSampler:
    """`augmented`: the content tile itself; the dataset re-augments it independently."""

    name = "augmented"
    set_size = 1

    def __init__(self, index: TileIndex):
        self.index = index

    def sample(self, rng: np.random.Generator, slide_id: str, content_index: int) -> list[TileRef]:
        return [(slide_id, int(content_index))]

    def sample_from_slide(self, rng: np.random.Generator, slide_id: str) -> list[TileRef]:
        return self.index.sample_from_slide(rng, slide_id, "augmented", 1)


def make_style_sampler(
    name: str, index: TileIndex, n_style: int, nearby_distance_um: float
) -> StyleSampler:
    """The sampler for `stedm.style_sampling` (`none`, `nearby`, `multi_patch`, `augmented`)."""
    _check_strategy(name)
    if name == "none":
        return NoStyleSampler(index)
    if name == "nearby":
        return NearbySampler(index, nearby_distance_um)
    if name == "multi_patch":
        return MultiPatchSampler(index, n_style)
    return AugmentedSampler(index)
