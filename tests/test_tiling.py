"""Tiling stage: tissue detection, tile store contents (pixels, labels, attrs), bad input via the
CLI (message names the file, exit code 1, nothing left behind), and streaming memory use."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stedm.tiling.tiler as tiler
from stedm.cli import main
from stedm.config import load_config
from stedm.data.manifest import SlideRecord, write_manifest
from stedm.data.slide import open_slide
from stedm.data.tiff import write_pyramidal_tiff
from stedm.io import sha256_file
from stedm.tiling.store import open_tile_store
from stedm.tiling.tiler import tile_slide
from stedm.tiling.tissue import tissue_mask

W, H = 1536, 1024
GLASS = (242, 240, 243)
# tissue rectangle in level-0 px; its left edge (x=160) cuts the second tile column of a
# 128 level-0 px grid, so that column holds tiles that are 3/4 tissue and 1/4 glass
TISSUE = (160, 128, 1408, 896)


def tissue_image(
    seed: int = 0, w: int = W, h: int = H, box: tuple[int, int, int, int] = TISSUE
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = GLASS
    x0, y0, x1, y1 = box
    pink = np.array([200, 110, 170]) + rng.integers(-40, 40, (y1 - y0, x1 - x0, 3))
    rgb[y0:y1, x0:x1] = np.clip(pink, 0, 255)
    return rgb


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, name: str) -> dict:
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def write_geojson(path: Path, *features: dict) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


CONFIG = {"tiling": {"mpp": 1.0, "tile_size": 64, "thumbnail_mpp": 4.0, "min_tissue_fraction": 0.5}}


@pytest.fixture(scope="module")
def slide_05(tmp_path_factory) -> Path:
    """1536 x 1024 px at 0.5 µm/px (levels at 0.5, 1, 2 µm/px), lossless."""
    path = tmp_path_factory.mktemp("slides") / "s05.tiff"
    write_pyramidal_tiff(path, tissue_image(), 0.5, n_levels=3, compression="zlib")
    return path


@pytest.fixture(scope="module")
def slide_025(tmp_path_factory) -> Path:
    """The same layout at 0.25 µm/px (levels 0.25, 0.5, 1 µm/px)."""
    path = tmp_path_factory.mktemp("slides") / "s025.tiff"
    write_pyramidal_tiff(path, tissue_image(seed=1), 0.25, n_levels=3, compression="zlib")
    return path


def record(slide: Path, annotation: Path | None = None, mpp: float | None = None) -> SlideRecord:
    return SlideRecord("s1", "p1", slide, annotation, mpp=mpp)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- tissue detection --------------------------------------------------------------------------
def test_tissue_mask_finds_tissue_and_nothing_on_blank_glass():
    rgb = tissue_image(w=384, h=256, box=(40, 32, 352, 224))
    mask = tissue_mask(rgb, "otsu")
    assert mask[40:220, 45:345].all() and not mask[:28].any() and not mask[:, :36].any()
    assert not tissue_mask(np.full((64, 64, 3), 255, np.uint8)).any()
    noisy_glass = np.clip(
        np.array(GLASS) + np.random.default_rng(0).integers(-3, 4, (64, 64, 3)), 0, 255
    )
    assert not tissue_mask(noisy_glass.astype(np.uint8)).any()
    assert not tissue_mask(np.zeros((64, 64, 3), np.uint8)).any()  # black scanner background
    fixed = tissue_mask(rgb, 0.1)
    assert fixed[40:220, 45:345].all() and not fixed[:28].any() and not tissue_mask(rgb, 0.9).any()


# -- store contents ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fixture, mpp",
    [
        ("slide_025", 0.5),
        ("slide_025", 0.7),
        ("slide_05", 1.0),
        ("slide_05", 0.4),
    ],  # 0.4: upsampling
)
def test_tiles_equal_read_region_mpp(request, tmp_path, fixture, mpp):
    slide_path = request.getfixturevalue(fixture)
    config = load_config({"tiling": {**CONFIG["tiling"], "mpp": mpp, "chunk_tiles": 4}})
    summary = tile_slide(record(slide_path), config, tmp_path / "s1.zarr", tmp_path / "s1.png")
    store = open_tile_store(tmp_path / "s1.zarr")
    assert store.n == summary["n_tiles"] > 10 and store.labels is None
    assert store.images.shape == (store.n, 64, 64, 3) and store.images.chunks == (4, 64, 64, 3)
    extent = 64 * mpp / open_slide(slide_path).mpp
    assert store.attrs["tile_size_level0"] == pytest.approx(extent)
    # row-major grid coordinates, tissue fractions above the threshold
    order = np.lexsort((store.coords[:, 0], store.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(store.n))
    assert (store.tissue >= 0.5).all() and store.tissue.dtype == np.float32
    cells = store.coords / extent  # origins are round(i * extent)
    assert np.abs(cells - np.rint(cells)).max() <= 0.5 / extent + 1e-9
    with open_slide(slide_path) as slide:
        for i in [0, store.n // 2, store.n - 1]:
            x, y = store.coords[i]
            images, _ = store.read([i])
            np.testing.assert_array_equal(images[0], slide.read_region_mpp(int(x), int(y), 64, mpp))


def test_store_attrs_and_thumbnail(tmp_path, slide_05):
    out, png = tmp_path / "s1.zarr", tmp_path / "s1.png"
    tile_slide(record(slide_05), load_config(CONFIG), out, png)
    attrs = open_tile_store(out).attrs
    assert attrs["slide_id"] == "s1" and attrs["patient_id"] == "p1"
    assert attrs["mpp"] == 1.0 and attrs["source_mpp"] == pytest.approx(0.5)
    assert attrs["tile_size"] == 64 and attrs["tile_size_level0"] == pytest.approx(128.0)
    assert (
        attrs["level0_size"] == [W, H]
        and attrs["annotated"] is False
        and attrs["annotation"] is None
    )
    assert (
        attrs["class_names"] == ["Background", "Stroma", "Tumor"] and attrs["ignore_index"] == 255
    )
    # tissue spans columns 160..1408 -> tiles 1..10 (tile 1 is 3/4 tissue), rows 128..896 -> 1..6
    assert attrs["n_tiles"] == 10 * 6
    assert attrs["source"] == {
        "path": str(slide_05),
        "size_bytes": slide_05.stat().st_size,
        "sha256": sha256_file(slide_05),
    }
    assert attrs["stedm_version"]
    thumb = np.asarray(Image.open(png))
    # drawn for people: longest side DISPLAY_PX (or the full slide if smaller), aspect kept
    assert max(thumb.shape[:2]) == min(tiler.DISPLAY_PX, max(H, W))
    assert thumb.shape[0] / thumb.shape[1] == pytest.approx(H / W, rel=0.01)
    assert (thumb[5, 5] == GLASS).all()  # glass untouched; tiles outlined in blue
    f = thumb.shape[1] / W  # display px per level-0 px
    assert tuple(thumb[round(128 * f), round(200 * f)]) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.png", "s1.zarr"]


def test_labels(tmp_path, slide_05):
    ann = write_geojson(
        tmp_path / "s1.geojson",
        feature(
            {"type": "Polygon", "coordinates": [square(600, 600, 700, 700)]}, "Tumor"
        ),  # nested, listed first
        feature(
            {
                "type": "Polygon",
                "coordinates": [square(256, 256, 768, 768), square(384, 384, 512, 512)],
            },
            "Stroma",
        ),
        feature(
            {
                "type": "MultiPolygon",
                "coordinates": [[square(900, 300, 1000, 400)], [square(1100, 300, 1200, 400)]],
            },
            "Tumor",
        ),
    )

    def label_at(store, x: int, y: int) -> int:
        (i,) = np.flatnonzero(
            (store.coords[:, 0] == x // 128 * 128) & (store.coords[:, 1] == y // 128 * 128)
        )
        _, labels = store.read([i])
        return int(labels[0, (y % 128) // 2, (x % 128) // 2])  # 1 tile px = 2 level-0 px

    tile_slide(record(slide_05, ann), load_config(CONFIG), tmp_path / "a.zarr", tmp_path / "a.png")
    store = open_tile_store(tmp_path / "a.zarr")
    assert store.labels.shape == (store.n, 64, 64) and store.labels.dtype == np.uint8
    assert label_at(store, 300, 300) == 1  # Stroma
    assert label_at(store, 449, 449) == 255  # the hole: unannotated tissue -> ignore
    assert label_at(store, 651, 651) == 2  # small Tumor inside the large Stroma wins
    assert label_at(store, 951, 351) == 2 and label_at(store, 1151, 351) == 2  # both parts
    assert label_at(store, 1051, 351) == 255  # between the parts
    assert label_at(store, 141, 501) == 0  # glass (x < 160) in a kept tile -> background
    assert label_at(store, 201, 501) == 255  # tissue, unannotated
    attrs = store.attrs["annotation"]
    assert attrs["path"] == str(ann) and attrs["sha256"] == sha256_file(ann)
    assert (attrs["n_features"], attrs["n_repaired"], attrs["n_skipped"]) == (3, 0, 0)
    _, all_labels = store.read(np.arange(store.n))
    counts = np.bincount(all_labels.ravel(), minlength=256)
    assert attrs["class_pixels"] == {
        "Background": counts[0],
        "Stroma": counts[1],
        "Tumor": counts[2],
        "ignore": counts[255],
    }
    # the stroma square minus its hole minus the nested tumour, in 2x2 level-0 px tile pixels
    assert counts[1] == (256 * 256 - 64 * 64 - 50 * 50)

    flipped = {**CONFIG, "labels": {"unannotated": "background", "outside_tissue": "ignore"}}
    tile_slide(record(slide_05, ann), load_config(flipped), tmp_path / "b.zarr", tmp_path / "b.png")
    store = open_tile_store(tmp_path / "b.zarr")
    assert label_at(store, 449, 449) == 0 and label_at(store, 141, 501) == 255
    assert label_at(store, 651, 651) == 2


def test_store_read_order_and_duplicates(tmp_path, slide_05):
    tile_slide(record(slide_05), load_config(CONFIG), tmp_path / "s.zarr", tmp_path / "s.png")
    store = open_tile_store(tmp_path / "s.zarr")
    every, _ = store.read(np.arange(store.n))
    some, labels = store.read([7, 2, 7, 30])
    assert labels is None
    np.testing.assert_array_equal(some, every[[7, 2, 7, 30]])


# -- the CLI and bad input -----------------------------------------------------------------------
def run_cli(tmp_path: Path, *args: str) -> int:
    return main(
        [
            "tile",
            *args,
            "--out",
            str(tmp_path / "out" / "s1.zarr"),
            "--thumbnail",
            str(tmp_path / "out" / "s1.png"),
            "--config",
            json.dumps(CONFIG),
        ]
    )


def assert_fails(tmp_path: Path, capsys, args: list[str], *named: str) -> str:
    assert run_cli(tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in named:
        assert text in err
    out = tmp_path / "out"
    assert not out.exists() or leftovers(out) == []
    return err


def test_cli_manifest_and_explicit_slide(tmp_path, slide_05, capsys):
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, [SlideRecord("s1", "p1", slide_05), SlideRecord("s2", "p2", slide_05)])
    assert run_cli(tmp_path, "--manifest", str(manifest), "--slide-id", "s1") == 0
    assert leftovers(tmp_path / "out") == ["s1.png", "s1.zarr"]
    assert open_tile_store(tmp_path / "out" / "s1.zarr").attrs["patient_id"] == "p1"
    assert (
        run_cli(tmp_path, "--slide", str(slide_05), "--slide-id", "s1", "--patient-id", "px") == 0
    )
    assert open_tile_store(tmp_path / "out" / "s1.zarr").attrs["patient_id"] == "px"
    assert leftovers(tmp_path / "out") == ["s1.png", "s1.zarr"]
    (tmp_path / "out" / "s1.png").unlink()
    import shutil

    shutil.rmtree(tmp_path / "out" / "s1.zarr")
    assert_fails(
        tmp_path, capsys, ["--manifest", str(manifest), "--slide-id", "nope"], str(manifest), "nope"
    )


def test_cli_non_slide_file(tmp_path, capsys):
    text = tmp_path / "slide.svs"
    text.write_text("not a slide")
    assert_fails(
        tmp_path, capsys, ["--slide", str(text)], str(text), "cannot open", "supported formats"
    )
    png = tmp_path / "slide.png"
    Image.fromarray(tissue_image(w=64, h=64, box=(8, 8, 56, 56))).save(png)
    assert_fails(tmp_path, capsys, ["--slide", str(png)], str(png), "cannot open")


def test_cli_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.tiff"
    assert_fails(tmp_path, capsys, ["--slide", str(missing)], str(missing), "not found")


def test_cli_missing_mpp_and_override(tmp_path, capsys):
    path = tmp_path / "no_mpp.tiff"
    write_pyramidal_tiff(path, tissue_image(), None, n_levels=2, compression="zlib")
    assert_fails(tmp_path, capsys, ["--slide", str(path)], str(path), "records no µm/px", "mpp")
    assert run_cli(tmp_path, "--slide", str(path), "--mpp", "0.5") == 0
    store = open_tile_store(tmp_path / "out" / "s1.zarr")
    assert store.attrs["source_mpp"] == 0.5 and store.n == 60


def test_cli_unknown_class(tmp_path, slide_05, capsys):
    ann = write_geojson(
        tmp_path / "s1.geojson",
        feature({"type": "Polygon", "coordinates": [square(300, 300, 400, 400)]}, "Necrosis"),
    )
    assert_fails(
        tmp_path,
        capsys,
        ["--slide", str(slide_05), "--annotation", str(ann)],
        str(ann),
        "Necrosis",
        "labels.classes",
        "labels.aliases",
    )


def test_cli_repaired_and_skipped_geometry_are_counted(tmp_path, slide_05):
    ann = write_geojson(
        tmp_path / "s1.geojson",
        feature(
            {
                "type": "Polygon",
                "coordinates": [[[300, 300], [500, 500], [500, 300], [300, 500], [300, 300]]],
            },
            "Tumor",
        ),
        feature({"type": "Polygon", "coordinates": []}, "Stroma"),
        feature({"type": "Polygon", "coordinates": [square(600, 600, 700, 700)]}, "Stroma"),
    )
    assert run_cli(tmp_path, "--slide", str(slide_05), "--annotation", str(ann)) == 0
    store = open_tile_store(tmp_path / "out" / "s1.zarr")
    attrs = store.attrs["annotation"]
    assert (attrs["n_features"], attrs["n_repaired"], attrs["n_skipped"]) == (3, 1, 1)
    assert (
        attrs["class_pixels"]["Tumor"] == 2 * 100 * 50 // 2
    )  # two triangles of the bow tie, 2x2 px


def test_cli_blank_slide(tmp_path, capsys):
    blank = tmp_path / "blank.tiff"
    write_pyramidal_tiff(blank, np.full((1024, 1024, 3), 255, np.uint8), 0.5, n_levels=2)
    err = assert_fails(
        tmp_path, capsys, ["--slide", str(blank)], str(blank), "blank", "tiling.min_tissue_fraction"
    )
    assert "tiling.tissue_threshold" in err


def test_interrupted_tiling_leaves_nothing(tmp_path, slide_05, monkeypatch):
    calls = []
    original = tiler._read_row

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tiler, "_read_row", failing)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(
            record(slide_05),
            load_config(CONFIG),
            tmp_path / "out" / "s.zarr",
            tmp_path / "out" / "s.png",
        )
    assert leftovers(tmp_path / "out") == []


# -- streaming ---------------------------------------------------------------------------------
def test_memory_does_not_grow_with_the_slide(tmp_path):
    """Peak Python allocations stay far below the bytes of all tiles: tiles stream row by row."""
    w, h = 2048, 8192  # memory may grow with the slide's width (one row), not its area
    path = tmp_path / "big.tiff"
    write_pyramidal_tiff(
        path, tissue_image(w=w, h=h, box=(64, 64, w - 64, h - 64)), 0.5, n_levels=4
    )
    config = load_config(
        {"tiling": {"mpp": 0.5, "tile_size": 64, "thumbnail_mpp": 8.0, "chunk_tiles": 16}}
    )
    tracemalloc.start()
    try:
        summary = tile_slide(record(path), config, tmp_path / "big.zarr", tmp_path / "big.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = summary["n_tiles"] * 64 * 64 * 3
    assert summary["n_tiles"] == 30 * 126
    assert peak < total / 5, f"peak {peak / 1e6:.1f} MB for {total / 1e6:.1f} MB of tiles"


@pytest.mark.parametrize("direct", [True, False])
def test_store_writer_chunks_round_trip(tmp_path, direct):
    """Chunks written straight to disk read back through zarr, edge chunk included."""
    from stedm.tiling.store import TileStoreWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (10, 8, 8), dtype=np.uint8)
    writer = TileStoreWriter(tmp_path / "w.zarr", 10, 8, chunk_tiles=4, labelled=True)
    assert all(w.direct for w in writer._writers)
    for w in writer._writers:
        w.direct = direct  # False: zarr's own writes (the fallback for other codecs)
    writer.write_index(np.zeros((10, 2), np.int64), np.ones(10, np.float32))
    for a, b in [(0, 3), (3, 8), (8, 10)]:  # rows that do not align with chunks
        writer.append(images[a:b], labels[a:b])
    writer.close({"n_tiles": 10})
    store = open_tile_store(tmp_path / "w.zarr")
    assert store.images.chunks == (4, 8, 8, 3) and store.attrs == {"n_tiles": 10}
    got_images, got_labels = store.read(np.arange(10))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert sorted(p.name for p in (tmp_path / "w.zarr" / "images").iterdir()) == [
        "c.0.0.0.0",
        "c.1.0.0.0",
        "c.2.0.0.0",
        "zarr.json",
    ]
