"""Diffusion training datasets on small synthetic tile stores."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from stedm.config import load_config
from stedm.diffusion.data import (
    NULL_STYLE_VALUE,
    AutoencoderTileDataset,
    CounterSampler,
    StedmTrainDataset,
    dihedral,
    layout_onehot,
)
from stedm.errors import StedmError

T = 16
TILE_L0 = 32.0  # level-0 px per tile (source 0.5 µm/px, tiles at 1 µm/px)
IGNORE = 255
CLASSES = ["Background", "Stroma", "Tumor"]


def write_store(
    path: Path, slide_id: str, images: np.ndarray, labels: np.ndarray | None = None
) -> Path:
    """A tile store after docs/contracts.md: a row-major grid 5 tiles wide."""
    n = len(images)
    coords = np.asarray([((k % 5) * TILE_L0, (k // 5) * TILE_L0) for k in range(n)], np.int64)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(1, T, T, 3))
    if labels is not None:
        group.create_array("labels", data=labels, chunks=(1, T, T))
    group.create_array("coords", data=coords.reshape(-1, 2))
    group.create_array("tissue", data=np.ones(n, np.float32))
    group.attrs.update(
        {
            "slide_id": slide_id,
            "mpp": 1.0,
            "source_mpp": 0.5,
            "tile_size": T,
            "tile_size_level0": TILE_L0,
            "annotated": labels is not None,
            "class_names": CLASSES,
            "ignore_index": IGNORE,
            "n_tiles": n,
        }
    )
    return path


def threshold_store(path: Path, slide_id: str, seed: int, n: int = 12, n_ignored: int = 2) -> Path:
    """Random images; label = Tumor where red > 127 else Stroma; the last tiles fully unannotated."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, T, T, 3), dtype=np.uint8)
    labels = np.where(images[..., 0] > 127, 2, 1).astype(np.uint8)
    labels[n - n_ignored :] = IGNORE
    return write_store(path, slide_id, images, labels)


@pytest.fixture
def stores(tmp_path: Path) -> list[Path]:
    return [threshold_store(tmp_path / f"s{k}.zarr", f"S{k}", seed=k) for k in range(2)]


def make(stores: list[Path], **kw) -> StedmTrainDataset:
    args = dict(
        sampling="multi_patch",
        n_style=3,
        nearby_distance_um=40.0,
        style_dropout=0.25,
        foreground_indices=[2],
        n_classes=3,
        ignore_index=IGNORE,
        num_samples=100,
        seed=0,
    )
    args.update(kw)
    return StedmTrainDataset(stores, **args)


def stored(path: Path, name: str, index: int) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[name][index])


def dihedral_match(tensor: torch.Tensor, tile: np.ndarray) -> list[tuple[int, bool]]:
    """Which of the 8 flips/rotations of `tile` (T, T, 3) uint8 give `tensor` (3, T, T)."""
    got = ((tensor.numpy().transpose(1, 2, 0) + 1.0) * 127.5).round().astype(np.uint8)
    return [
        (k, f) for k in range(4) for f in (False, True) if np.array_equal(dihedral(tile, k, f), got)
    ]


def assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# --------------------------------------------------------------------------- layout
def test_binary_layout_of_known_tile() -> None:
    label = np.array([[0, 1], [2, IGNORE]], dtype=np.uint8)
    out = layout_onehot(label, "binary", [2], 3, IGNORE)
    assert out.dtype == np.float32 and out.shape == (2, 2, 2)
    np.testing.assert_array_equal(
        out[0], [[1, 1], [0, 0]]
    )  # background = every non-foreground class
    np.testing.assert_array_equal(out[1], [[0, 0], [1, 0]])  # foreground = class 2
    classes = layout_onehot(label, "classes", [2], 3, IGNORE)
    assert classes.shape == (3, 2, 2)
    np.testing.assert_array_equal(classes[:, 1, 1], [0, 0, 0])  # ignore pixel: all zero
    np.testing.assert_array_equal(classes.argmax(0).ravel()[:3], [0, 1, 2])
    two_fg = layout_onehot(label, "binary", [1, 2], 3, IGNORE)
    np.testing.assert_array_equal(two_fg[1], [[0, 1], [1, 0]])


def test_layout_rejects_unknown_classes() -> None:
    with pytest.raises(StedmError, match="exceed the 3 configured classes"):
        layout_onehot(np.array([[0, 5]], np.uint8), "binary", [2], 3, IGNORE)
    with pytest.raises(StedmError, match="stedm.layout"):
        layout_onehot(np.zeros((2, 2), np.uint8), "rgb", [2], 3, IGNORE)


# --------------------------------------------------------------------------- training items
def test_item_shapes_dtypes_ranges(stores: list[Path]) -> None:
    ds = make(stores, style_dropout=0.0)
    assert len(ds) == 100
    item = ds[0]
    assert item["image"].shape == (3, T, T) and item["image"].dtype == torch.float32
    assert item["layout"].shape == (2, T, T) and item["layout"].dtype == torch.float32
    assert item["style"].shape == (3, 3, T, T) and item["style"].dtype == torch.float32
    assert item["style_tiles"].shape == (3,) and item["style_dropped"].dtype == torch.bool
    for key in ("image", "style"):
        assert item[key].min() >= -1.0 and item[key].max() <= 1.0
    assert set(item["layout"].unique().tolist()) <= {0.0, 1.0}
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["style"].shape == (4, 3, 3, T, T) and batch["style_dropped"].shape == (4,)
    classes = make(stores, layout="classes")[0]["layout"]
    assert classes.shape == (3, T, T)


def test_content_and_layout_get_the_same_augmentation(stores: list[Path]) -> None:
    ds = make(stores, style_dropout=1.0)
    transforms = set()
    for i in range(64):
        item = ds[i]
        path = stores[int(item["slide_id"][1])]
        raw = stored(path, "images", item["tile_index"])
        # the stored label is "red > 127", so the foreground channel must still match the image
        fg = item["layout"][1].numpy().astype(bool)
        np.testing.assert_array_equal(fg, item["image"][0].numpy() > 0)
        np.testing.assert_array_equal(item["layout"].sum(0).numpy(), 1.0)  # no ignore in content
        matches = dihedral_match(item["image"], raw)
        assert matches
        transforms.add(matches[0])
    assert len(transforms) == 8  # all flips/rotations occur


def test_fully_unannotated_tiles_are_never_content(stores: list[Path]) -> None:
    ds = make(stores, style_dropout=1.0)
    assert {ds[i]["tile_index"] for i in range(300)} == set(range(10))


def test_style_tiles_are_independently_augmented(stores: list[Path]) -> None:
    ds = make(stores, sampling="augmented", style_dropout=0.0)
    same = 0
    for i in range(80):
        item = ds[i]
        raw = stored(stores[int(item["slide_id"][1])], "images", item["tile_index"])
        assert item["style"].shape == (1, 3, T, T)
        assert item["style_tiles"].tolist() == [item["tile_index"]]
        content_t, style_t = (
            dihedral_match(item["image"], raw),
            dihedral_match(item["style"][0], raw),
        )
        assert content_t and style_t  # the style is the content tile, re-augmented
        same += content_t[0] == style_t[0]
    assert same < 30  # independent draws agree ~1/8 of the time

    ds = make(stores, sampling="multi_patch", n_style=3, style_dropout=0.0)
    for i in range(20):
        item = ds[i]
        path = stores[int(item["slide_id"][1])]
        tiles = item["style_tiles"].tolist()
        assert len(set(tiles)) == 3
        for style, tile in zip(item["style"], tiles, strict=True):
            assert dihedral_match(style, stored(path, "images", tile))


def test_nearby_items_take_style_from_neighbours(stores: list[Path]) -> None:
    ds = make(stores, sampling="nearby", nearby_distance_um=20.0, style_dropout=0.0)
    for i in range(40):
        item = ds[i]
        slide = ds.index[item["slide_id"]]
        (j,) = item["style_tiles"].tolist()
        d_um = np.linalg.norm(slide.centres[j] - slide.centres[item["tile_index"]]) * 0.5
        assert j != item["tile_index"] and d_um <= 20.0


def test_style_dropout_rate_and_null_style(stores: list[Path]) -> None:
    p, n = 0.3, 3000
    ds = make(stores, style_dropout=p, num_samples=n, n_style=2)
    dropped = 0
    for i in range(n):
        item = ds[i]
        if item["style_dropped"]:
            dropped += 1
            assert torch.all(item["style"] == NULL_STYLE_VALUE)
            assert item["style"].shape == (2, 3, T, T)
            assert item["style_tiles"].tolist() == [-1, -1]
        else:
            assert item["style"].min() >= -1.0
    assert abs(dropped / n - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_none_sampling_gives_null_style(stores: list[Path]) -> None:
    item = make(stores, sampling="none", style_dropout=0.0)[5]
    assert item["style"].shape == (1, 3, T, T)
    assert torch.all(item["style"] == NULL_STYLE_VALUE) and bool(item["style_dropped"])


def test_items_are_deterministic(stores: list[Path]) -> None:
    a, b = make(stores), make(stores)  # two instances, as in two processes
    for i in (0, 7, 12345):  # any global counter, also beyond len()
        assert_items_equal(a[i], b[i])
    clone = pickle.loads(pickle.dumps(a))  # what a spawned worker receives
    assert_items_equal(clone[3], a[3])
    uncached = make(stores, cache_limit_mb=0.0)  # per-tile zarr reads give the same items
    assert not uncached.reader.cache and a.reader.cache
    assert_items_equal(uncached[4], a[4])
    c = make(stores, style_dropout=0.0)
    assert not torch.equal(c[0]["style"], c[1]["style"])  # different index -> different item
    assert not torch.equal(c[0]["style"], make(stores, seed=1, style_dropout=0.0)[0]["style"])
    with pytest.raises(IndexError):
        a[-1]


def test_dataloader_workers_reproduce_items(stores: list[Path]) -> None:
    ds = make(stores)
    loader = DataLoader(ds, batch_size=4, num_workers=2, sampler=CounterSampler(100, 108))
    batches = list(loader)
    assert len(CounterSampler(100, 108)) == 8
    direct = [ds[i] for i in range(100, 108)]
    got = torch.cat([b["style"] for b in batches])
    assert torch.equal(got, torch.stack([d["style"] for d in direct]))


def test_balance_foreground(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 20
    images = rng.integers(0, 256, (n, T, T, 3), dtype=np.uint8)
    labels = np.ones((n, T, T), np.uint8)
    labels[:2, :4, :4] = 2  # 2 of 20 tiles contain foreground
    store = write_store(tmp_path / "fg.zarr", "FG", images, labels)
    m = 2000
    for balance, expected in ((True, 0.5), (False, 0.1)):
        ds = make([store], sampling="none", balance_foreground=balance, num_samples=m)
        frac = np.mean([ds[i]["tile_index"] < 2 for i in range(m)])
        assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / m)


def test_unlabelled_slide_is_an_error(tmp_path: Path, stores: list[Path]) -> None:
    images = np.zeros((3, T, T, 3), np.uint8)
    bare = write_store(tmp_path / "bare.zarr", "BARE", images)
    with pytest.raises(StedmError, match="BARE"):
        make([*stores, bare])


def test_ignore_index_mismatch_is_an_error(stores: list[Path]) -> None:
    with pytest.raises(StedmError, match="ignore_index"):
        make(stores, ignore_index=0)


def test_from_config(stores: list[Path]) -> None:
    config = load_config({"stedm": {"style_sampling": "nearby", "style_dropout": 0.0}})
    ds = StedmTrainDataset.from_config(stores, config, num_samples=10)
    assert ds.sampler.name == "nearby" and ds.set_size == 1 and ds.foreground_indices == (2,)
    assert ds[0]["style"].shape == (1, 3, T, T)


# --------------------------------------------------------------------------- autoencoder items
def test_autoencoder_dataset(tmp_path: Path, stores: list[Path]) -> None:
    images = np.random.default_rng(9).integers(0, 256, (4, T, T, 3), dtype=np.uint8)
    bare = write_store(tmp_path / "bare.zarr", "BARE", images)  # unlabelled stores are fine here
    ds = AutoencoderTileDataset([*stores, bare], num_samples=50, seed=3)
    assert len(ds) == 50
    seen = set()
    for i in range(50):
        item = ds[i]
        assert (
            item["image"].shape == (3, T, T)
            and -1 <= item["image"].min() <= item["image"].max() <= 1
        )
        path = {"S0": stores[0], "S1": stores[1], "BARE": bare}[item["slide_id"]]
        assert dihedral_match(item["image"], stored(path, "images", item["tile_index"]))
        seen.add(item["slide_id"])
    assert seen == {"S0", "S1", "BARE"}
    again = AutoencoderTileDataset([*stores, bare], num_samples=50, seed=3)
    assert torch.equal(again[17]["image"], ds[17]["image"])
