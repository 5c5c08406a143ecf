"""Trainers: the autoencoder stage and STEDM training, including exact resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stores import write_store

from stedm.config import load_config
from stedm.diffusion.train import train_stedm
from stedm.diffusion.train_autoencoder import train_autoencoder
from stedm.errors import StedmError
from stedm.models.autoencoder import get_scaling_factor, load_autoencoder
from stedm.models.stedm import StedmModel


def cfg(tmp_path, **stedm):
    return load_config({
        "results_dir": str(tmp_path / "results"),
        "tracking": {"enabled": False},
        "tiling": {"tile_size": 32},
        "autoencoder": {"steps": 4, "batch_size": 4},
        "stedm": {"steps": 6, "batch_size": 4, "checkpoint_every": 3, "n_style": 2, **stedm},
    })


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    stores = [write_store(tmp / f"s{i}.zarr", f"s{i}", seed=i) for i in range(3)]
    info = train_autoencoder(cfg(tmp), stores[:2], stores[2:], tmp / "ae", tmp / "ae.work")
    return tmp, stores, info


def test_autoencoder_stage_saves_model_with_scaling_factor(trained_ae):
    tmp, _, info = trained_ae
    ae = load_autoencoder(tmp / "ae")
    assert get_scaling_factor(ae) == pytest.approx(info["scaling_factor"]) and info["scaling_factor"] > 0
    assert info["latent_shape"] == [4, 8, 8]
    assert np.isfinite(info["validation"]["psnr_db"])
    assert (tmp / "ae" / "loss_curve.png").stat().st_size > 0
    assert len(info["history"]) >= 1


def test_stedm_training_saves_ema_model_and_resumes_exactly(trained_ae, tmp_path):
    _, stores, _ = trained_ae
    ae_dir = trained_ae[0] / "ae"
    config = cfg(tmp_path)
    full = train_stedm(config, 2, stores[:2], ae_dir, tmp_path / "full", tmp_path / "full.work")
    # interrupted after 4 steps: the checkpoint at step 3 survives, step 4 is lost and redone
    partial = train_stedm(config, 2, stores[:2], ae_dir, tmp_path / "res", tmp_path / "res.work", stop_after=4)
    assert partial["step"] == 4 and not (tmp_path / "res").exists()  # no half-written output
    resumed = train_stedm(config, 2, stores[:2], ae_dir, tmp_path / "res", tmp_path / "res.work")
    assert resumed["resumed_from"] == 3  # the newest checkpoint before the interruption
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "res" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = StedmModel.from_pretrained(tmp_path / "full")
    assert model.config.aggregation == "linear" and model.config.n_style == 2
    run = json.loads((tmp_path / "full" / "stedm_run.json").read_text())
    assert run["weights"] == "ema" and run["slides"] == ["s0", "s1"]
    # EMA weights differ from the last raw weights in the checkpoint
    raw = load_file(next((tmp_path / "full.work" / "checkpoints").glob("step-000006")) / "model.safetensors")
    assert any(not torch.equal(raw[k], a[k]) for k in a if k in raw)


def test_budget_slide_without_labels_fails(trained_ae, tmp_path):
    _, _, _ = trained_ae
    store = write_store(tmp_path / "u.zarr", "u", labels=False)
    with pytest.raises(StedmError, match="u"):
        train_stedm(cfg(tmp_path), 1, [store], trained_ae[0] / "ae", tmp_path / "o", tmp_path / "o.work")


@pytest.mark.parametrize("sampling", ["nearby", "augmented", "none"])
def test_single_tile_and_no_style_strategies_train(trained_ae, tmp_path, sampling):
    """nearby/augmented sets hold one tile, so a `linear` aggregation must be built for n = 1."""
    _, stores, _ = trained_ae
    config = cfg(tmp_path, style_sampling=sampling, steps=2, checkpoint_every=2)
    train_stedm(config, 2, stores[:2], trained_ae[0] / "ae", tmp_path / "m", tmp_path / "m.work")
    model = StedmModel.from_pretrained(tmp_path / "m")
    expected = {"nearby": ("linear", 1), "augmented": ("linear", 1), "none": ("none", 1)}[sampling]
    assert (model.config.aggregation, model.config.n_style) == expected


def test_step_sampler_shards_disjointly_and_resumes():
    from stedm.diffusion.loop import StepSampler

    single = list(StepSampler(0, 5, batch=4, accum=2))
    assert single == list(range(40))  # one process reads the counters in order
    assert list(StepSampler(3, 5, batch=4, accum=2)) == single[24:]  # resume at step 3
    ranks = [list(StepSampler(0, 5, batch=4, accum=2, world=2, rank=r)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(80))
    assert ranks[1][:4] == [4, 5, 6, 7]  # a micro-batch is a contiguous block of counters


def test_rerun_after_a_config_change_does_not_resume_the_old_run(trained_ae, tmp_path):
    """A finished run's checkpoints must not be 'resumed' under another config (stale model)."""
    _, stores, _ = trained_ae
    ae = trained_ae[0] / "ae"
    work = tmp_path / "shared.work"
    train_stedm(cfg(tmp_path, lr=1e-3), 2, stores[:2], ae, tmp_path / "a", work)
    changed = train_stedm(cfg(tmp_path, lr=1e-2), 2, stores[:2], ae, tmp_path / "b", work)
    assert changed["resumed_from"] is None
    train_stedm(cfg(tmp_path, lr=1e-2), 2, stores[:2], ae, tmp_path / "c", tmp_path / "fresh.work")
    b, c = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    a = load_file(tmp_path / "a" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the same config again resumes the finished run (nothing to redo) and gives the same model
    again = train_stedm(cfg(tmp_path, lr=1e-2), 2, stores[:2], ae, tmp_path / "d", work)
    assert again["resumed_from"] == 6
