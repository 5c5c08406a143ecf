"""Generation metrics: FID/IS with injected seeded networks, missing weights, style and layout fidelity."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import zarr
from stores import write_store

from stedm.cli import main
from stedm.config import load_config
from stedm.data.stain import (
    RGB_FROM_HED,
    concentrations_to_rgb,
    rgb_to_concentrations,
    stain_matrix,
)
from stedm.metrics import ReportConfig, load_stage_config
from stedm.metrics.fid import (
    INCEPTION_FILE,
    array_batches,
    frechet_distance,
    generation_quality,
    inception_score,
)
from stedm.metrics.generation import evaluate_generation, read_synthetic
from stedm.metrics.layout_fidelity import layout_fidelity, load_segmenter
from stedm.metrics.style_fidelity import image_descriptor, style_fidelity
from stedm.tracking import tracking_uri


class SmallFeatures(torch.nn.Module):
    """A seeded stand-in for Inception: uint8 (B, 3, H, W) -> (B, 16) features."""

    def __init__(self, seed: int = 0, out: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, out, 3, stride=2),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


class Uniform(torch.nn.Module):
    """A classifier that predicts the same (uniform) distribution for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10)


def textures(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 170, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)


def batches(images: np.ndarray):
    return array_batches(images, range(len(images)), 16)


# --------------------------------------------------------------------------- FID / IS
def test_fid_zero_for_identical_sets_and_monotone_in_brightness():
    real = textures(96, seed=1)
    feature = SmallFeatures()
    same = frechet_distance(batches(real), batches(real.copy()), feature=feature)
    shifted = [
        frechet_distance(batches(real), batches(np.clip(real.astype(int) + d, 0, 255).astype(np.uint8)),
                         feature=feature)
        for d in (10, 25, 50)
    ]
    assert abs(same) < 1e-3
    assert shifted[0] > 100 * max(abs(same), 1e-6)
    assert shifted[0] < shifted[1] < shifted[2]


def test_inception_score_finite_and_one_for_uniform_predictions():
    images = textures(40, seed=2)
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(SmallFeatures(seed=3), torch.nn.Linear(16, 10))
    mean, std = inception_score(batches(images), classifier=classifier)
    assert np.isfinite(mean) and np.isfinite(std) and mean >= 1.0
    mean_u, std_u = inception_score(batches(images), classifier=Uniform())
    assert mean_u == pytest.approx(1.0, abs=1e-6)
    assert std_u == pytest.approx(0.0, abs=1e-6)


def test_missing_weights_give_status_not_a_number(tmp_path, monkeypatch):
    images = textures(8)
    missing = tmp_path / "weights" / INCEPTION_FILE
    result = generation_quality(batches(images), batches(images), n_images=8, tile_size=32, weights=missing)
    assert result == {
        "status": "not computed",
        "reason": f"no Inception weights at {missing}; place {INCEPTION_FILE} there or set "
                  "report.inception_weights",
    }
    # no configured path: torch's hub cache is looked at (and is empty here)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = generation_quality(batches(images), batches(images), n_images=8, tile_size=32)
    assert result["status"] == "not computed"
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in result["reason"]
    assert "fid" not in result


def test_generation_quality_with_injected_networks_states_its_setup():
    real, fake = textures(20, seed=4), textures(20, seed=5)
    result = generation_quality(batches(real), batches(fake), n_images=20, tile_size=32,
                                feature=SmallFeatures(), classifier=Uniform())
    assert result["status"] == "computed"
    assert result["fid"] > 0 and result["is_mean"] == pytest.approx(1.0, abs=1e-6)
    assert (result["n_images"], result["tile_size"], result["resolution"]) == (20, 32, 299)
    assert result["network"] == "injected test network"


# --------------------------------------------------------------------------- style fidelity
STAINS = {
    "A": RGB_FROM_HED,
    "B": stain_matrix([0.45, 0.85, 0.30], [0.20, 0.95, 0.25]),
    "C": stain_matrix([0.75, 0.60, 0.25], [0.02, 0.80, 0.60]),
}


def stained_tiles(matrix: np.ndarray, n: int, seed: int, size: int = 32) -> np.ndarray:
    """Tissue-like tiles: blocky hematoxylin nuclei on eosin stroma, rendered with `matrix`."""
    rng = np.random.default_rng(seed)
    h = np.kron(rng.uniform(0.0, 1.6, (n, size // 4, size // 4)), np.ones((4, 4)))[..., None]
    e = rng.uniform(0.3, 0.9, (n, size, size, 1))
    conc = np.concatenate([h, e], -1) * rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    return concentrations_to_rgb(conc, matrix)


def test_style_fidelity_matches_recoloured_images_to_their_slide():
    real = {s: stained_tiles(m, 24, seed=k) for k, (s, m) in enumerate(STAINS.items())}
    fake, slides = [], []
    for k, (target, matrix) in enumerate(STAINS.items()):
        source = [s for s in STAINS if s != target][0]  # another slide's tiles, recoloured with target's stain
        conc = rgb_to_concentrations(stained_tiles(STAINS[source], 10, seed=10 + k), STAINS[source])
        fake.append(concentrations_to_rgb(conc[..., :2], matrix))
        slides += [target] * 10
    result = style_fidelity(np.concatenate(fake), slides, real, tiles_per_slide=12)
    assert result["status"] == "computed"
    assert result["top1"] == 1.0
    assert result["chance"] == pytest.approx(1 / 3)
    assert result["mean_own_distance"] < result["mean_other_distance"]
    assert result["real_tiles_top1"] == 1.0
    assert np.trace(np.asarray(result["confusion"])) == 30
    assert image_descriptor(fake[0][0]).shape == (21,)


def test_style_fidelity_not_computed_without_styles():
    result = style_fidelity(textures(4), [""] * 4, {"A": textures(4), "B": textures(4)})
    assert result["status"] == "not computed" and "none" in result["reason"]


# --------------------------------------------------------------------------- layout fidelity
def test_layout_fidelity_dice_of_oracle_and_blind_segmenters():
    images = textures(12, seed=6)
    labels = np.where(images[..., 0] > 120, 2, 1).astype(np.uint8)
    labels[:, :2] = 255  # ignored border
    oracle = layout_fidelity(lambda x: x[..., 0] > 120, images, labels, range(12), foreground=(2,),
                             ignore_index=255, reference=(images, labels, range(6)))
    assert oracle["dice_mean"] == pytest.approx(1.0) and oracle["dice_pooled"] == pytest.approx(1.0)
    assert oracle["real_reference"]["n_images"] == 6
    blind = layout_fidelity(lambda x: np.zeros(x.shape[:3], bool), images, labels, range(12),
                            foreground=(2,), ignore_index=255)
    assert blind["dice_pooled"] == 0.0 and blind["real_reference"] is None


# --------------------------------------------------------------------------- the stage
def write_synthetic(path, tile_stores: dict[str, np.ndarray], n: int = 12, tile: int = 32) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    styles = sorted(tile_stores)
    slide_of = [styles[i % len(styles)] for i in range(n)]
    images = np.stack([tile_stores[s][rng.integers(len(tile_stores[s]))] for s in slide_of])
    group.create_array("images", data=images, chunks=(1, tile, tile, 3))
    group.create_array("labels", data=np.where(images[..., 0] > 130, 2, 1).astype(np.uint8),
                       chunks=(1, tile, tile))
    for name, values in (("style_slide", slide_of), ("strategy", ["multi_patch"] * n), ("style_tiles", ["0;1;2"] * n)):
        group.create_array(name, shape=(n,), chunks=(n,), dtype=str)  # as stedm.synthesis.generate
        group[name][:] = np.asarray(values)
    group.attrs.update({"budget": 2, "tile_size": tile, "mpp": 1.0, "class_names": ["Background", "Stroma", "Tumor"],
                        "ignore_index": 255, "n_samples": n, "sampling": {"sampler": "ddim", "steps": 2}})


@pytest.fixture
def tiny_results(tmp_path):
    tiles = tmp_path / "results" / "tiles"
    stores = {}
    for k, s in enumerate(["train0", "val0", "test0", "style0", "style1"]):
        write_store(tiles / f"{s}.zarr", s, n=12, seed=k, labels=not s.startswith("style"))
        stores[s] = np.asarray(zarr.open_group(str(tiles / f"{s}.zarr"))["images"][:])
    splits = {"val": ["val0"], "test": ["test0"], "style_pool": ["style0", "style1"],
              "budgets": {"1": ["train0"]}, "train_pool": ["train0"]}
    (tmp_path / "results" / "splits").mkdir(parents=True)
    (tmp_path / "results" / "splits" / "splits.json").write_text(json.dumps(splits))
    syn = tmp_path / "results" / "synthesis" / "budget~1" / "synthetic.zarr"
    write_synthetic(syn, {s: stores[s] for s in ("style0", "style1")})
    return tmp_path / "results"


def test_read_synthetic_provenance(tiny_results):
    syn = read_synthetic(tiny_results / "synthesis" / "budget~1" / "synthetic.zarr")
    assert len(syn) == 12 and syn.style_slides[:2] == ["style0", "style1"]
    assert set(syn.strategies) == {"multi_patch"}


def test_evaluate_generation_statuses(tiny_results, tmp_path, monkeypatch):
    from stedm.segmentation.model import SegModelConfig, build_model, save_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    config = load_config({"results_dir": str(tiny_results)})
    report = ReportConfig(fid_max_images=8, style_tiles_per_slide=6)
    splits = json.loads((tiny_results / "splits" / "splits.json").read_text())
    kwargs = dict(budget=1, synthetic=tiny_results / "synthesis" / "budget~1" / "synthetic.zarr",
                  splits=splits, tiles_dir=tiny_results / "tiles")
    result = evaluate_generation(config, report, seg_model=None, **kwargs)
    assert result["fid_is"]["status"] == "not computed" and "fid" not in result["fid_is"]
    assert result["layout_fidelity"] == {"status": "not computed",
                                         "reason": "no real-arm model for the largest budget"}
    assert result["style_fidelity"]["status"] == "computed"
    assert result["style_fidelity"]["n_slides"] == 2
    assert result["style"] == {"style_sampling": "multi_patch", "aggregation": "linear", "n_style": 3,
                               "trained_style_sampling": "multi_patch"}
    assert result["reference"]["slides"] == ["test0", "val0"]
    # a (random, untrained) real-arm model through the segmentation package's loader
    cfg = SegModelConfig.from_workflow(config.segmentation, config.labels, tile_size=32, tile_mpp=1.0)
    torch.manual_seed(0)
    save_model(build_model(cfg), cfg, tmp_path / "seg_model")
    result = evaluate_generation(config, report, seg_model=tmp_path / "seg_model", **kwargs)
    layout = result["layout_fidelity"]
    assert layout["status"] == "computed" and layout["n_images"] == 12
    assert layout["real_reference"]["n_images"] == 12  # capped by layout_max_images = 1000, 24 labelled tiles
    predict = load_segmenter(tmp_path / "seg_model", "cpu")
    assert predict(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 32, 32)


def test_cli_writes_json_figure_and_mlflow_run(tiny_results, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = {"results_dir": str(tiny_results), "report": {"fid_max_images": 8}}
    out = tiny_results / "metrics" / "generation" / "budget~1.json"
    rc = main(["evaluate-generation", "--budget", "1", "--synthetic",
               str(tiny_results / "synthesis" / "budget~1" / "synthetic.zarr"),
               "--splits", str(tiny_results / "splits" / "splits.json"), "--tiles-dir", str(tiny_results / "tiles"),
               "--config", json.dumps(cfg), "--out", str(out), "--figure", str(out.with_suffix(".png"))])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["fid_is"]["status"] == "not computed"
    assert out.with_suffix(".png").stat().st_size > 1000
    config, report = load_stage_config(cfg)
    assert report.fid_max_images == 8
    mlflow.set_tracking_uri(tracking_uri(config))
    runs = {r.info.run_name: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    run = runs["evaluate_generation budget~1"]
    assert run.data.tags["mlflow.parentRunId"] == runs["budget~1/seed~0"].info.run_id
    assert run.data.tags["fid_is_status"] == "not computed"
    assert "style_top1" in run.data.metrics and "fid" not in run.data.metrics
    assert run.data.params["report.fid_max_images"] == "8"


def test_store_without_provenance_says_so(tiny_results, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    syn = tmp_path / "bare.zarr"
    g = zarr.open_group(str(syn), mode="w", zarr_format=3)
    g.create_array("images", data=np.full((4, 32, 32, 3), 180, np.uint8))
    g.create_array("labels", data=np.ones((4, 32, 32), np.uint8))
    assert read_synthetic(syn).has_style_provenance is False
    splits = json.loads((tiny_results / "splits" / "splits.json").read_text())
    result = evaluate_generation(load_config({"results_dir": str(tiny_results)}), ReportConfig(), budget=1,
                                 synthetic=syn, splits=splits, tiles_dir=tiny_results / "tiles", seg_model=None)
    assert result["style_fidelity"] == {"status": "not computed",
                                        "reason": f"{syn} records no per-sample style slide (`style_slide`)"}
