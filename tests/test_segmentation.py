"""Segmentation stage: metrics against hand-computed values, real/synthetic mixing per batch,
targets and augmentation, model presets and local encoder weights, training with best-validation
selection and resumption, and the CLI's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from stores import write_store
from torch.utils.data import DataLoader

from stedm.cli import main
from stedm.config import Config, load_config
from stedm.diffusion.data import CounterSampler
from stedm.errors import StedmError
from stedm.segmentation.data import SegTrainDataset, ValidationTiles, make_target, n_synthetic
from stedm.segmentation.metrics import (
    Counts,
    dice_score,
    foreground_counts,
    iou_score,
    pool_by_patient,
    summarize,
)
from stedm.segmentation.model import (
    SegModelConfig,
    build_model,
    load_encoder_weights,
    load_model,
    save_model,
)
from stedm.segmentation.train import train_segmentation, validation_counts

TUMOR, STROMA, IGNORE = 2, 1, 255


# --------------------------------------------------------------------------- metrics
def test_counts_dice_iou_by_hand():
    pred = np.array([[1, 1, 0, 0, 1, 0]], bool)
    gt = np.array([[2, 1, 2, 0, IGNORE, IGNORE]], np.uint8)  # the ignored pixels never count
    c = foreground_counts(pred, gt, [TUMOR], IGNORE)
    assert (c.tp, c.fp, c.fn, c.tn, c.n_pixels) == (1, 1, 1, 1, 4)
    assert c.dice == pytest.approx(2 / 4) and c.iou == pytest.approx(1 / 3)
    # several foreground classes count as one
    c2 = foreground_counts(pred, gt, [STROMA, TUMOR], IGNORE)
    assert (c2.tp, c2.fp, c2.fn, c2.tn) == (2, 0, 1, 1)
    assert c2.dice == pytest.approx(4 / 5)


def test_empty_masks():
    gt_empty = np.array([[1, 0, IGNORE]], np.uint8)
    both_empty = foreground_counts(np.array([[0, 0, 1]], bool), gt_empty, [TUMOR], IGNORE)
    assert math.isnan(both_empty.dice) and math.isnan(both_empty.iou)  # prediction on ignore only
    only_pred = foreground_counts(np.array([[1, 0, 0]], bool), gt_empty, [TUMOR], IGNORE)
    assert only_pred.dice == 0.0 and only_pred.iou == 0.0
    only_gt = foreground_counts(np.zeros((1, 2), bool), np.array([[2, 0]], np.uint8), [TUMOR], IGNORE)
    assert only_gt.dice == 0.0
    assert math.isnan(dice_score(0, 0, 0)) and dice_score(3, 1, 1) == pytest.approx(0.75)
    assert iou_score(3, 1, 1) == pytest.approx(0.6)


def test_patient_pools_counts_not_dice():
    slides = {"a1": Counts(tp=10, fp=0, fn=0, tn=5), "a2": Counts(tp=0, fp=0, fn=10, tn=5),
              "b1": Counts(tp=3, fp=1, fn=0, tn=0)}
    patients = pool_by_patient(slides, {"a1": "A", "a2": "A", "b1": "B"})
    assert patients["A"] == Counts(tp=10, fp=0, fn=10, tn=10)
    # 2*10 / (20 + 0 + 10), not mean(1.0, 0.0) = 0.5
    assert patients["A"].dice == pytest.approx(2 / 3)
    assert patients["B"].dice == pytest.approx(6 / 7)


def test_summarize_nan_and_worst_k():
    s = summarize([0.9, float("nan"), 0.5, 0.7], worst_k=2)
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 3 and s["n_nan"] == 1
    assert s["std"] == pytest.approx(np.std([0.9, 0.5, 0.7]))  # ddof = 0
    assert s["min"] == 0.5 and s["worst_k_mean"] == pytest.approx(0.6) and s["worst_k"] == 2
    assert summarize([0.4], worst_k=3)["worst_k_mean"] == pytest.approx(0.4)
    assert math.isnan(summarize([float("nan")], 2)["mean"])


# --------------------------------------------------------------------------- data
def write_synthetic(path: Path, n: int = 10, tile: int = 32) -> Path:
    """A synthetic store: green-ish tiles, label Tumor on the left half."""
    images = np.zeros((n, tile, tile, 3), np.uint8)
    images[..., 1] = 200
    labels = np.ones((n, tile, tile), np.uint8)
    labels[:, :, : tile // 2] = TUMOR
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images, chunks=(1, tile, tile, 3))
    group.create_array("labels", data=labels, chunks=(1, tile, tile))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("segstores")
    real = [write_store(tmp / f"s{i}.zarr", f"s{i}", seed=i) for i in range(2)]
    val = write_store(tmp / "v.zarr", "v", seed=5)
    return tmp, real, val, write_synthetic(tmp / "synthetic.zarr")


def dataset(stores, **kwargs) -> SegTrainDataset:
    _, real, _, synthetic = stores
    args = dict(foreground=[TUMOR], n_classes=3, batch_size=8, num_samples=400, synthetic_store=synthetic,
                synthetic_fraction=0.8, seed=3)
    return SegTrainDataset(real, **{**args, **kwargs})


@pytest.mark.parametrize(("fraction", "batch", "expected"), [(0.8, 8, 6), (0.3, 5, 2), (0.5, 4, 2), (1.0, 3, 3)])
def test_mixing_ratio_per_batch_and_overall(stores, fraction, batch, expected):
    assert n_synthetic(fraction, batch) == expected == math.floor(fraction * batch + 0.5)
    ds = dataset(stores, synthetic_fraction=fraction, batch_size=batch, num_samples=batch * 12)
    # the training loop's loader: global sample counters, resumed mid-run at step 5
    for start in (0, 5 * batch):
        loader = DataLoader(ds, batch_size=batch, sampler=CounterSampler(start, batch * 12), drop_last=True)
        per_batch = [int(b["synthetic"].sum()) for b in loader]
        assert per_batch == [expected] * (12 - start // batch)
    total = sum(ds.is_synthetic(i) for i in range(batch * 12))
    assert total == expected * 12


def test_items_deterministic_augmented_alike_and_jittered(stores):
    a, b = dataset(stores), dataset(stores)
    for i in range(16):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        # write_store labels Tumor where red > 130: flips/rotations hit image and target alike
        red = (x["image"][0] + 1) * 127.5
        if not x["synthetic"]:
            assert torch.equal(x["target"], (red.round() > 130).long())
        else:  # synthetic: Tumor half is green-channel tiles' left half, rotated/flipped
            assert x["target"].sum() == 32 * 16
    jitter = dataset(stores, stain_augmentation=True)
    plain = dataset(stores)
    real = [i for i in range(16) if not plain.is_synthetic(i)]
    synth = [i for i in range(16) if plain.is_synthetic(i)]
    assert all(not torch.equal(jitter[i]["image"], plain[i]["image"]) for i in real)
    assert all(torch.equal(jitter[i]["image"], plain[i]["image"]) for i in synth)


def test_real_only_arm(stores):
    ds = dataset(stores, synthetic_fraction=0.0, synthetic_store=None)
    items = [ds[i] for i in range(200)]
    assert not any(bool(it["synthetic"]) for it in items)
    with pytest.raises(StedmError, match="synthetic store"):
        dataset(stores, synthetic_store=None)


def test_make_target():
    label = np.array([[0, 1, 2, IGNORE]], np.uint8)
    assert make_target(label, "binary", [TUMOR], 3, IGNORE).tolist() == [[0, 0, 1, IGNORE]]
    assert make_target(label, "classes", [TUMOR], 3, IGNORE).tolist() == [[0, 1, 2, IGNORE]]
    with pytest.raises(StedmError, match="exceed"):
        make_target(np.array([[4]], np.uint8), "classes", [TUMOR], 3, IGNORE)


# --------------------------------------------------------------------------- model
def seg_config(tmp_path, tracking: bool = False, **seg) -> Config:
    return load_config({
        "results_dir": str(tmp_path / "results"), "tracking": {"enabled": tracking},
        "segmentation": {"steps": 6, "batch_size": 4, "val_every": 2, "lr": 3e-3, **seg},
    })


def test_presets_and_encoder_weights(tmp_path):
    config = seg_config(tmp_path)
    cfg = SegModelConfig.from_workflow(config.segmentation, config.labels, tile_size=32, tile_mpp=1.0)
    assert (cfg.classes, cfg.foreground, cfg.class_names) == (2, (1,), ("background", "Tumor"))
    paper = SegModelConfig.from_workflow(seg_config(tmp_path, preset="paper", target="classes").segmentation,
                                         config.labels, tile_size=64, tile_mpp=1.0)
    assert paper.encoder_name == "mit_b2" and paper.classes == 3 and paper.foreground == (2,)
    with pytest.raises(StedmError, match="multiple of 32"):
        SegModelConfig.from_workflow(seg_config(tmp_path, preset="paper").segmentation, config.labels,
                                     tile_size=100, tile_mpp=1.0)
    torch.manual_seed(0)
    source = build_model(cfg)
    save_file({f"encoder.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()},
              str(tmp_path / "enc.safetensors"))
    torch.manual_seed(1)
    target = build_model(cfg)
    load_encoder_weights(target, tmp_path / "enc.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.encoder.state_dict().values(),
                                                 target.encoder.state_dict().values(), strict=True))
    other = build_model(SegModelConfig.from_workflow(seg_config(tmp_path, encoder="resnet18").segmentation,
                                                     config.labels, tile_size=32, tile_mpp=1.0))
    torch.save(other.encoder.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(StedmError, match="does not match"):
        load_encoder_weights(target, tmp_path / "r18.pt")
    with pytest.raises(StedmError, match="not found"):
        load_encoder_weights(target, tmp_path / "missing.pt")
    save_model(target, cfg, tmp_path / "m")
    loaded, cfg2 = load_model(tmp_path / "m")
    assert cfg2 == cfg and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                 target.state_dict().values(), strict=True))


class _Oracle(torch.nn.Module):
    """Predicts Tumor where the red channel is high: the write_store label rule."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        fg = ((x[:, 0] + 1) * 127.5).round() > 130
        return torch.stack([~fg, fg], 1).float() * 10 + self.p


def test_validation_counts_pool_over_tiles(stores):
    _, real, val, _ = stores
    tiles = ValidationTiles([val, *real], target="binary", foreground=[TUMOR], n_classes=3)
    assert tiles.n_tiles == 36
    counts = validation_counts(_Oracle(), tiles, (1,), IGNORE, batch_size=5)
    assert counts.dice == 1.0 and counts.n_pixels == 36 * 32 * 32


# --------------------------------------------------------------------------- training
def scripted(scores: dict[int, float]):
    def validate(model, step):
        return scores[step]
    return validate


def test_training_selects_best_step_and_resumes(stores, tmp_path):
    _, real, val, synthetic = stores
    config = seg_config(tmp_path)
    kwargs = dict(budget=2, arm="real+stedm", seed=0, train_stores=real, val_stores=[val], synthetic_store=synthetic)
    scores = {2: 0.3, 4: 0.7, 6: 0.5}
    full = train_segmentation(config, out=tmp_path / "full", work_dir=tmp_path / "full.work",
                              validate=scripted(scores), **kwargs)
    assert full["best_step"] == 4 and full["best_val_dice"] == 0.7 and full["synthetic_per_batch"] == 3
    saved = load_file(tmp_path / "full" / "model.safetensors")
    at4 = load_file(tmp_path / "full.work" / "checkpoints" / "step-000004" / "model.safetensors")
    last = load_file(tmp_path / "full.work" / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(saved[k], at4[k]) for k in saved)  # the best step's weights were kept
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    torch.manual_seed(0)
    init = build_model(SegModelConfig.from_dict(json.loads((tmp_path / "full" / "config.json").read_text())))
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in saved.items())  # it trained
    training = json.loads((tmp_path / "full" / "training.json").read_text())
    assert [v["dice"] for v in training["val_history"]] == [0.3, 0.7, 0.5] and training["weights"] == "best"
    assert (tmp_path / "full" / "training_curve.png").stat().st_size > 0
    # interrupted after 3 steps: resumes from the step-2 checkpoint and ends identically
    partial = train_segmentation(config, out=tmp_path / "res", work_dir=tmp_path / "res.work",
                                 validate=scripted(scores), stop_after=3, **kwargs)
    assert partial["step"] == 3 and not (tmp_path / "res").exists()
    resumed = train_segmentation(config, out=tmp_path / "res", work_dir=tmp_path / "res.work",
                                 validate=scripted(scores), **kwargs)
    assert resumed["resumed_from"] == 2 and resumed["best_step"] == 4
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    again = load_file(tmp_path / "res" / "model.safetensors")
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_training_with_real_validation_and_tracking(stores, tmp_path):
    import mlflow

    _, real, val, _ = stores
    config = seg_config(tmp_path, tracking=True, steps=4, val_every=4)  # arm names with '+' reach MLflow
    out = train_segmentation(config, budget=2, arm="real+stainaug", seed=1, train_stores=real, val_stores=[val],
                             out=tmp_path / "m", work_dir=tmp_path / "m.work")
    assert out["best_step"] == 4 and 0.0 <= out["best_val_dice"] <= 1.0 and out["synthetic_per_batch"] == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["stedm"], output_format="list")
    run = next(r for r in runs if r.info.run_name == "train_segmentation budget~2/arm~real+stainaug/seed~1")
    assert run.data.metrics["val_dice"] == pytest.approx(out["best_val_dice"])
    assert run.data.params["arm_config.stain_augmentation"] == "True"


def test_cli_errors(stores, tmp_path, capsys):
    tmp, real, val, _ = stores
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"budgets": {"2": ["s0", "s1"]}, "val": ["v"], "test": []}))
    base = ["train-seg", "--splits", str(splits), "--tiles-dir", str(tmp), "--out", str(tmp_path / "o"),
            "--seed", "0", "--config", json.dumps({"tracking": {"enabled": False},
                                                   "segmentation": {"arms": {"few": {"budgets": [6]}}}})]
    assert main([*base, "--budget", "2", "--arm", "nope"]) == 1
    assert "not in segmentation.arms" in capsys.readouterr().err
    assert main([*base, "--budget", "2", "--arm", "few"]) == 1
    assert "does not run for budget 2" in capsys.readouterr().err
    assert main([*base, "--budget", "3", "--arm", "few"]) == 1
    assert "budget 3 is not in" in capsys.readouterr().err
