"""Workflow tests: dry-runs of every configuration we ship, and one tiny end-to-end run on CPU."""

from __future__ import annotations

import re
import shutil

import pytest
from workflow_utils import snakemake

TINY = {
    "cohort": {"demo": {"n_slides": 14, "n_two_slide_patients": 2, "size_px": 1024}},
    "tiling": {"tile_size": 64},
    "splits": {"budgets": [2, 4], "n_val": 2, "n_test": 3},
    "autoencoder": {"steps": 8, "batch_size": 4},
    "stedm": {"steps": 8, "batch_size": 4, "n_style": 2, "checkpoint_every": 4},
    "synthesis": {"n_samples": 8, "n_shards": 2, "batch_size": 4, "steps": 4},
    "segmentation": {"steps": 6, "batch_size": 4, "val_every": 3},
}


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's "Job stats" table."""
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_demo_dry_run_plans_every_stage(tmp_path):
    result = snakemake(tmp_path, "-n")
    assert result.returncode == 0, result.stderr + result.stdout
    counts = job_counts(result.stdout)
    assert counts["tile_slide"] == 48
    assert counts["make_demo_cohort"] == 1 and counts["make_splits"] == 1
    assert counts["train_autoencoder"] == 1
    assert counts["train_stedm"] == 2  # one per budget (6, 24)


PAPER = {
    "tiling": {"tile_size": 512},
    "autoencoder": {"preset": "paper", "kind": "vq"},
    "stedm": {"preset": "paper", "style_encoder": "swin_v2_t", "n_style": 10, "batch_size": 8,
              "grad_accum": 8},
    "synthesis": {"n_samples": 20000, "sampler": "ddim", "steps": 128, "n_shards": 8},
    "segmentation": {"preset": "paper", "seeds": [0, 1, 2]},
}


def test_paper_preset_plans_the_same_dag_with_paper_settings(tmp_path):
    demo = job_counts(snakemake(tmp_path / "demo", "-n").stdout)
    result = snakemake(tmp_path / "paper", "-n", "-p", config=PAPER)
    assert result.returncode == 0, result.stderr + result.stdout
    paper = job_counts(result.stdout)
    assert set(paper) == set(demo)  # the same stages
    assert paper["train_stedm"] == 2  # budgets {6, 24}
    assert paper["train_segmentation"] == paper["evaluate_segmentation"] == 2 * 3 * 3  # budgets x arms x 3 seeds
    assert paper["generate_synthetic"] == 2 * 8
    assert '"preset": "paper"' in result.stdout and '"sampler": "ddim"' in result.stdout


def test_invalid_config_fails_before_running(tmp_path):
    result = snakemake(tmp_path, "-n", config={"tiling": {"mpp": -1}})
    assert result.returncode != 0
    assert "tiling" in (result.stderr + result.stdout) and "mpp" in (result.stderr + result.stdout)


@pytest.mark.slow
def test_tiny_end_to_end_run_is_complete_and_incremental(tmp_path):
    result = snakemake(tmp_path, "--cores", "2", config=TINY)
    assert result.returncode == 0, result.stderr[-5000:]
    results = tmp_path / "results"
    assert (results / "splits" / "splits.json").is_file()
    assert len(list((results / "tiles").glob("*.zarr"))) == 14
    for budget in (2, 4):
        assert (results / "stedm" / f"budget~{budget}" / "model" / "model.safetensors").is_file()
    # a second run has nothing to do
    again = snakemake(tmp_path, "-n", config=TINY)
    assert "Nothing to be done" in again.stdout + again.stderr
    # deleting one tile store reruns exactly that tiling job (and what depends on it)
    shutil.rmtree(results / "tiles" / "demo_003.zarr")
    plan = snakemake(tmp_path, "-n", config=TINY)
    assert job_counts(plan.stdout).get("tile_slide") == 1
