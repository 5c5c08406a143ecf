"""Whole-slide evaluation: window grid and tissue skipping, stitching with blending proven by oracle
"models" (exact ground truth -> Dice 1, ground truth shifted by k px -> the Dice of the shifted masks),
a non-integer slide-to-working downsample, ground truth identical to the tiler's label tiles, and
metrics.json / overlays / CLI of a whole evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stedm.cli import main
from stedm.config import load_config
from stedm.data.annotations import load_annotations
from stedm.data.manifest import SlideRecord, write_manifest
from stedm.data.slide import open_slide
from stedm.data.tiff import write_pyramidal_tiff
from stedm.segmentation.evaluate import GroundTruth, evaluate_model, evaluate_slide, slide_tissue
from stedm.segmentation.model import SegModelConfig, build_model, save_model
from stedm.segmentation.wsi import SlidePrediction, blend_window, window_starts, window_tissue
from stedm.tiling.store import open_tile_store
from stedm.tiling.tiler import tile_slide

TILE = 64
CONFIG = {
    "tracking": {"enabled": False},
    "tiling": {"mpp": 1.0, "tile_size": TILE, "thumbnail_mpp": 4.0, "min_tissue_fraction": 0.5},
    "segmentation": {"eval_overlap": 0.25, "eval_batch_size": 7, "worst_k": 1},
}
GLASS = (242, 240, 243)


def poly(points) -> dict:
    return {"type": "Polygon", "coordinates": [[*map(list, points), list(points[0])]]}


def feature(geometry: dict, name: str) -> dict:
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def make_slide(folder: Path, name: str, mpp: float, f: float) -> SlideRecord:
    """A glass slide with a tissue rectangle, Stroma on its left part (the rest of the tissue is
    unannotated -> ignore) and a Tumor pentagon well inside; all coordinates scaled by f."""
    w, h = int(1280 * f), int(896 * f)  # glass on the right: skipped windows
    rng = np.random.default_rng(int(f * 10))
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = GLASS
    x0, y0, x1, y1 = (int(v * f) for v in (64, 64, 960, 832))
    rgb[y0:y1, x0:x1] = np.clip(np.array([200, 110, 170]) + rng.integers(-40, 40, (y1 - y0, x1 - x0, 3)), 0, 255)
    slide = folder / f"{name}.tiff"
    write_pyramidal_tiff(slide, rgb, mpp, n_levels=3, compression="zlib")
    # vertices off the pixel lattice: a pixel centre exactly on an edge is a tie that float round-off
    # of tile vs. strip origins could break either way (1-2 px per slide)
    tumour = [(v[0] * f + 0.37, v[1] * f + 0.21) for v in ((250, 200), (600, 180), (650, 500), (420, 650), (200, 520))]
    stroma = [(x0, y0), (700 * f, y0), (700 * f, y1), (x0, y1)]
    ann = folder / f"{name}.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(poly(stroma), "Stroma"), feature(poly(tumour), "Tumor")]}))
    return SlideRecord(name, "P1", slide, ann)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wsi")
    # 0.5 µm/px: the working 1 µm/px grid is 2 level-0 px (tiles align with the tiler's);
    # 0.3 µm/px: 3.33 level-0 px per working px, read from the 0.6 µm/px level and box-resampled
    return tmp, make_slide(tmp, "a", 0.5, 1.0), make_slide(tmp, "b", 0.3, 1.5)


def model_cfg(config) -> SegModelConfig:
    return SegModelConfig.from_workflow(config.segmentation, config.labels, tile_size=TILE, tile_mpp=1.0)


def full_truth(record: SlideRecord, config, block_px: int = 4096) -> np.ndarray:
    """The slide's whole label map at 1 µm/px in one piece (the evaluation builds it in strips)."""
    with open_slide(record.slide_path) as slide:
        w, h = slide.size_at(1.0)
        truth = GroundTruth(load_annotations(record.annotation_path, config.labels), config.labels,
                            slide_tissue(slide, config), width=w, scale0=1.0 / slide.mpp,
                            mask_scale=1.0 / config.tiling.thumbnail_mpp, block_px=block_px)
        return truth.rows(0, h)


def oracle(labels: np.ndarray, shift: int = 0):
    """A 'model' that looks up the ground-truth foreground at each window (shifted right by `shift`)."""
    fg = np.pad(labels == 2, ((0, TILE), (0, TILE + shift)))

    def predict(images: torch.Tensor, windows: np.ndarray) -> torch.Tensor:
        assert images.shape[1:] == (3, TILE, TILE) and images.min() >= -1 and images.max() <= 1
        out = np.stack([fg[y : y + TILE, x + shift : x + shift + TILE] for x, y in windows])
        out = torch.from_numpy(out)
        return torch.stack([~out, out], 1).float() * 8.0

    return predict


def test_window_grid_blend_and_tissue():
    assert window_starts(200, 64, 48).tolist() == [0, 48, 96, 136]
    assert window_starts(64, 64, 48).tolist() == [0] and window_starts(30, 64, 48).tolist() == [0]
    w = blend_window(64)
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() == pytest.approx(1e-3) and np.allclose(w, w.T)
    mask = np.zeros((10, 10), bool)
    mask[6, 8] = True  # one tissue pixel; mask px = 2 working px
    has = window_tissue(mask, np.array([0, 12, 14]), np.array([0, 11]), 4, 0.5)  # x 12-16 misses it
    assert has.tolist() == [[False, False, False], [False, False, True]]


def test_ground_truth_equals_tiler_labels(slides, tmp_path):
    _, record, _ = slides
    config = load_config(CONFIG)
    truth = full_truth(record, config)
    assert {0, 1, 2, 255} <= set(np.unique(truth).tolist())
    assert np.array_equal(full_truth(record, config, block_px=128), truth)  # column blocks join seamlessly
    tile_slide(record, config, tmp_path / "a.zarr", tmp_path / "a.png")
    store = open_tile_store(tmp_path / "a.zarr")
    images, labels = store.read(np.arange(store.n))
    for (x0, y0), label in zip(store.coords // 2, labels, strict=True):
        assert np.array_equal(label, truth[y0 : y0 + TILE, x0 : x0 + TILE])


@pytest.mark.parametrize("which", [1, 2])
def test_oracle_stitching_gives_exact_and_shifted_dice(slides, which):
    record = slides[which]
    config = load_config(CONFIG)
    truth = full_truth(record, config)
    cfg = model_cfg(config)
    exact, overlay, info = evaluate_slide(record, oracle(truth), config, cfg, progress=False)
    n_fg = int((truth == 2).sum())
    assert exact.dice == 1.0 and exact.tp == n_fg and exact.fp == exact.fn == 0
    assert exact.n_pixels == int((truth != 255).sum())
    assert 0 < info["n_windows"] < info["n_windows_total"]  # glass-only windows were skipped
    assert overlay.size == (truth.shape[1], truth.shape[0])  # <= 1024 px: the working resolution
    k = 5
    shifted, _, _ = evaluate_slide(record, oracle(truth, k), config, cfg, progress=False)
    pred = np.zeros_like(truth, dtype=bool)
    pred[:, :-k] = truth[:, k:] == 2
    gt, valid = truth == 2, truth != 255
    expected = 2 * (pred & gt).sum() / ((pred & valid).sum() + gt.sum())
    assert shifted.dice == pytest.approx(expected, abs=1e-12) and 0.9 < expected < 1.0


def test_strips_bound_memory_and_cover_every_row(slides):
    record = slides[2]
    with open_slide(record.slide_path) as slide:
        prediction = SlidePrediction(slide, lambda x, w: torch.zeros(len(x), 2, TILE, TILE), mpp=1.0, tile=TILE,
                                     overlap=0.25, tissue=None, tissue_mpp=None, foreground=(1,), n_classes=2,
                                     batch_size=4, progress=False)
        strips = list(prediction)
    assert prediction._acc.shape == (2, TILE + 48, prediction.width) and prediction.width == 576
    rows = np.concatenate([np.arange(y, y + fg.shape[0]) for y, fg in strips])
    assert rows.tolist() == list(range(prediction.height))
    assert prediction.n_windows == prediction.n_windows_total == 12 * 9


def test_evaluate_model_pools_patient_and_writes_outputs(slides, tmp_path):
    _, a, b = slides
    config = load_config(CONFIG)
    records = {"a": a, "b": b, "c": SlideRecord("c", "P2", a.slide_path, None)}

    def everything(images, windows):  # foreground everywhere it predicts
        return torch.stack([torch.zeros(len(images), TILE, TILE), torch.ones(len(images), TILE, TILE)], 1)

    metrics = evaluate_model(config, model_dir=tmp_path / "m", test_slides=["a", "b", "c"], records=records,
                             out=tmp_path / "metrics.json", overlays_dir=tmp_path / "overlays",
                             identity={"budget": 6, "arm": "real+stedm", "seed": 0}, predictor=everything,
                             model_cfg=model_cfg(config))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["skipped_slides"] == ["c"]
    sa, sb, p = saved["slides"]["a"], saved["slides"]["b"], saved["patients"]["P1"]
    for key in ("tp", "fp", "fn", "tn", "n_pixels"):
        assert p[key] == sa[key] + sb[key]
    assert p["dice"] == pytest.approx(2 * p["tp"] / (2 * p["tp"] + p["fp"] + p["fn"]))
    assert p["slides"] == ["a", "b"] and sa["fn"] == 0
    agg = saved["aggregate"]["dice"]
    assert agg["n"] == 1 and agg["mean"] == pytest.approx(p["dice"]) and agg["std"] == 0.0
    assert saved["pooled"]["dice"] == pytest.approx(p["dice"]) and saved["arm"] == "real+stedm"
    assert sorted(f.name for f in (tmp_path / "overlays").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "overlays" / "b.png").size == (576, 403)


def test_cli_evaluates_a_saved_model(slides, tmp_path):
    _, a, _ = slides
    config = load_config(CONFIG)
    torch.manual_seed(0)
    cfg = model_cfg(config)
    save_model(build_model(cfg), cfg, tmp_path / "model")
    write_manifest(tmp_path / "manifest.csv", [a])
    (tmp_path / "splits.json").write_text(json.dumps({"test": ["a"]}))
    code = main(["evaluate-seg", "--budget", "6", "--arm", "real", "--seed", "0", "--model", str(tmp_path / "model"),
                 "--splits", str(tmp_path / "splits.json"), "--manifest", str(tmp_path / "manifest.csv"),
                 "--out", str(tmp_path / "metrics.json"), "--overlays", str(tmp_path / "ov"),
                 "--config", json.dumps(CONFIG)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"budget", "arm", "seed", "model_dir", "slides", "patients", "aggregate", "pooled"}
    assert metrics["slides"]["a"]["n_pixels"] > 0 and (tmp_path / "ov" / "a.png").is_file()
