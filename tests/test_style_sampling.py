"""Style samplers on small synthetic tile stores with known coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from stedm.diffusion.style_sampling import (
    AugmentedSampler,
    MultiPatchSampler,
    NearbySampler,
    NoStyleSampler,
    TileIndex,
    make_style_sampler,
)
from stedm.errors import StedmError

TILE_L0 = 100.0  # level-0 px per tile


def write_coords_store(path: Path, slide_id: str, coords: np.ndarray, source_mpp: float) -> Path:
    """A store with coords/tissue/attrs only: the index must not need pixel arrays."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
    group.create_array("tissue", data=np.ones(len(coords), dtype=np.float32))
    group.attrs.update(
        {"slide_id": slide_id, "source_mpp": source_mpp, "tile_size_level0": TILE_L0, "mpp": 1.0}
    )
    return path


def grid(nx: int, ny: int, drop: tuple[int, ...] = ()) -> np.ndarray:
    pts = [(x * TILE_L0, y * TILE_L0) for y in range(ny) for x in range(nx)]
    return np.asarray([p for i, p in enumerate(pts) if i not in drop], dtype=np.int64)


@pytest.fixture
def index(tmp_path: Path) -> TileIndex:
    stores = [
        # irregular grid (holes) at 0.5 µm/px; tile 4 is missing
        write_coords_store(tmp_path / "a.zarr", "A", grid(6, 5, drop=(4, 11, 17)), 0.5),
        # same coordinate space, other slide, finer scan: a radius in µm covers more level-0 px
        write_coords_store(tmp_path / "b.zarr", "B", grid(5, 5), 0.25),
        # a single tile
        write_coords_store(tmp_path / "c.zarr", "C", grid(1, 1), 0.5),
        # three tiles, one isolated far away
        write_coords_store(
            tmp_path / "d.zarr", "D", np.asarray([[0, 0], [100, 0], [5000, 5000]]), 0.5
        ),
    ]
    return TileIndex(stores)


def brute_force_neighbours(index: TileIndex, slide_id: str, i: int, distance_um: float) -> set[int]:
    slide = index[slide_id]
    d = np.linalg.norm(slide.centres - slide.centres[i], axis=1)
    return {int(j) for j in np.flatnonzero(d <= distance_um / slide.source_mpp) if j != i}


def test_index_reads_geometry_only(index: TileIndex) -> None:
    assert index.slide_ids == ["A", "B", "C", "D"]
    assert index["A"].n == 27 and index["C"].n == 1
    np.testing.assert_allclose(index["A"].centres[0], [50.0, 50.0])
    with pytest.raises(StedmError, match="not in the style tile index"):
        index["Z"]


def test_duplicate_slide_id_is_an_error(tmp_path: Path) -> None:
    a = write_coords_store(tmp_path / "a.zarr", "A", grid(2, 2), 0.5)
    b = write_coords_store(tmp_path / "b.zarr", "A", grid(2, 2), 0.5)
    with pytest.raises(StedmError, match="appears twice"):
        TileIndex([a, b])


def test_missing_attributes_are_reported(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    group.create_array("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(StedmError, match="source_mpp"):
        TileIndex([tmp_path / "x.zarr"])


# 120 µm = 240 level-0 px on A (2.4 tiles) and 480 px on B (4.8 tiles): not on a grid distance
@pytest.mark.parametrize("slide_id", ["A", "B"])
def test_nearby_matches_brute_force(index: TileIndex, slide_id: str) -> None:
    sampler = NearbySampler(index, distance_um=120.0)
    rng = np.random.default_rng(0)
    for i in range(index[slide_id].n):
        expected = brute_force_neighbours(index, slide_id, i, 120.0)
        assert expected, "every tile of these grids has neighbours in range"
        seen = set()
        for _ in range(200):
            refs = sampler.sample(rng, slide_id, i)
            assert len(refs) == 1
            (sid, j) = refs[0]
            assert sid == slide_id  # never another slide
            assert j != i  # never the content tile when others are in range
            seen.add(j)
        assert seen <= expected
        # every candidate is reachable: the draw is uniform over the neighbour list
        assert seen == expected or len(expected) > 20
        assert sorted(index.neighbours(slide_id, 120.0).of(i).tolist()) == sorted(expected)


def test_nearby_radius_scales_with_source_mpp(index: TileIndex) -> None:
    # tile (x=2, y=1) in both slides; 60 µm is 120 level-0 px on A (0.5 µm/px): its 4-neighbourhood;
    # on B (0.25 µm/px) it is 240 px = 2.4 tiles: the 20 offsets with dx² + dy² <= 5.76, less the
    # 3 with dy = -2 that fall outside the 5 x 5 grid = 17
    a = int(np.flatnonzero((index["A"].coords == [200, 100]).all(axis=1))[0])
    b = int(np.flatnonzero((index["B"].coords == [200, 100]).all(axis=1))[0])
    assert len(index.neighbours("A", 60.0).of(a)) == 4
    assert len(index.neighbours("B", 60.0).of(b)) == 17


def test_nearby_falls_back_to_content_tile_when_alone(index: TileIndex) -> None:
    sampler = NearbySampler(index, distance_um=120.0)
    rng = np.random.default_rng(1)
    assert sampler.sample(rng, "C", 0) == [("C", 0)]  # single-tile slide
    assert sampler.sample(rng, "D", 2) == [("D", 2)]  # isolated tile
    assert {sampler.sample(rng, "D", 0)[0] for _ in range(20)} == {("D", 1)}


def test_multi_patch_distinct_tiles_of_same_slide(index: TileIndex) -> None:
    sampler = MultiPatchSampler(index, n=10)
    rng = np.random.default_rng(2)
    counts = np.zeros(index["A"].n)
    for content in range(index["A"].n):
        refs = sampler.sample(rng, "A", content)
        assert len(refs) == 10
        assert {sid for sid, _ in refs} == {"A"}
        tiles = [j for _, j in refs]
        assert len(set(tiles)) == 10
        assert all(0 <= j < index["A"].n for j in tiles)
        counts[tiles] += 1
    assert (counts > 0).all()  # all tiles reachable


def test_multi_patch_with_fewer_tiles_than_n(index: TileIndex) -> None:
    # documented: every tile once, the rest drawn with replacement, so the set keeps size n
    sampler = MultiPatchSampler(index, n=5)
    refs = sampler.sample(np.random.default_rng(3), "D", 0)
    tiles = [j for _, j in refs]
    assert len(tiles) == 5 and set(tiles) == {0, 1, 2}
    assert sampler.sample(np.random.default_rng(3), "C", 0) == [("C", 0)] * 5


def test_none_and_augmented(index: TileIndex) -> None:
    rng = np.random.default_rng(4)
    assert NoStyleSampler(index).sample(rng, "A", 3) == []
    assert NoStyleSampler(index).set_size == 0
    assert AugmentedSampler(index).sample(rng, "A", 3) == [("A", 3)]
    assert AugmentedSampler(index).set_size == 1


def test_factory(index: TileIndex) -> None:
    assert isinstance(make_style_sampler("none", index, 4, 100.0), NoStyleSampler)
    assert isinstance(make_style_sampler("nearby", index, 4, 100.0), NearbySampler)
    mp = make_style_sampler("multi_patch", index, 4, 100.0)
    assert isinstance(mp, MultiPatchSampler) and mp.set_size == 4
    assert isinstance(make_style_sampler("augmented", index, 4, 100.0), AugmentedSampler)
    with pytest.raises(StedmError, match="unknown style sampling"):
        make_style_sampler("mp", index, 4, 100.0)


def test_same_rng_same_draws(index: TileIndex) -> None:
    for name in ("nearby", "multi_patch", "augmented"):
        sampler = make_style_sampler(name, index, 4, 120.0)
        a = [sampler.sample(np.random.default_rng([7, k]), "A", k) for k in range(20)]
        b = [sampler.sample(np.random.default_rng([7, k]), "A", k) for k in range(20)]
        assert a == b


def test_sample_from_slide(index: TileIndex) -> None:
    rng = np.random.default_rng(5)
    assert index.sample_from_slide(rng, "B", "none", 4) == []
    for _ in range(50):
        ((sid, j),) = index.sample_from_slide(rng, "B", "nearby", 1, nearby_distance_um=120.0)
        assert sid == "B" and 0 <= j < index["B"].n
        refs = index.sample_from_slide(rng, "B", "multi_patch", 6)
        assert len({j for _, j in refs}) == 6 and {s for s, _ in refs} == {"B"}
        ((sid, j),) = index.sample_from_slide(rng, "B", "augmented", 1)
        assert sid == "B"
    # the sampler objects delegate with their own settings
    mp = make_style_sampler("multi_patch", index, 3, 120.0)
    assert len(mp.sample_from_slide(rng, "A")) == 3
    nb = make_style_sampler("nearby", index, 3, 120.0)
    assert nb.sample_from_slide(rng, "C") == [("C", 0)]
    with pytest.raises(StedmError, match="unknown style sampling"):
        index.sample_from_slide(rng, "B", "random", 1)


def test_empty_slide_cannot_give_style(tmp_path: Path) -> None:
    path = write_coords_store(tmp_path / "e.zarr", "E", np.zeros((0, 2)), 0.5)
    index = TileIndex([path])
    with pytest.raises(StedmError, match="no tissue tiles"):
        index.sample_from_slide(np.random.default_rng(0), "E", "multi_patch", 2)
