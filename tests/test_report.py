"""Report: the gap-closed formula, seed handling, and the whole report from a tiny results folder."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import zarr
from PIL import Image

from stedm.cli import main
from stedm.config import load_config
from stedm.report.tables import (
    UNDEFINED_GAP,
    SegRun,
    fmt_gap,
    gap_closed,
    headline_markdown,
    headline_rows,
    read_seg_metrics,
    segmentation_markdown,
    segmentation_rows,
)
from stedm.segmentation.metrics import summarize
from stedm.tracking import tracking_uri

ARMS = ["real", "real+stedm", "real+stainaug"]


# --------------------------------------------------------------------------- the formula
@pytest.mark.parametrize(("arm", "expected"), [(0.75, 0.5), (1.0, 1.0), (1.2, 1.4), (0.4, -0.2)])
def test_gap_closed_values(arm, expected):
    assert gap_closed(arm, 0.5, 1.0) == pytest.approx(expected)


def test_gap_closed_undefined_without_gap():
    assert gap_closed(0.7, 0.6, 0.6) is None
    assert gap_closed(0.7, 0.6, 0.6 + 1e-12) is None
    assert fmt_gap(None) == UNDEFINED_GAP == "undefined (no gap between budgets)"
    assert fmt_gap(0.5) == "50 %"


def run(budget, arm, seed, mean, std=0.1, patients=None) -> SegRun:
    patients = patients or {"P1": mean - std, "P2": mean + std}
    return SegRun(budget, arm, seed, mean, std, mean - 0.1, std, mean - std, mean - std, 1, mean, mean - 0.1,
                  patients)


def test_headline_equal_baselines_say_undefined():
    runs = [run(6, "real", 0, 0.6), run(24, "real", 0, 0.6), run(6, "real+stedm", 0, 0.7)]
    (row,) = headline_rows(runs, [6, 24], "real", ["real", "real+stedm"])
    assert row["gap_closed"] is None and row["note"].startswith(UNDEFINED_GAP) and "+0.000" in row["note"]
    (md,) = headline_markdown([row])
    assert md["gap closed"] == UNDEFINED_GAP


def test_headline_paired_seeds_give_spread_and_unpaired_say_so():
    runs = [run(6, "real", s, 0.5) for s in (0, 1)] + [run(24, "real", s, 1.0) for s in (0, 1)]
    runs += [run(6, "real+stedm", 0, 0.7), run(6, "real+stedm", 1, 0.8, std=0.05)]
    (row,) = headline_rows(runs, [6, 24], "real", ["real", "real+stedm"])
    assert row["gap_closed"] == pytest.approx(0.5)  # (0.75 - 0.5) / (1.0 - 0.5)
    assert row["gap_closed_per_seed"] == "0.4;0.6"
    assert row["gap_closed_seed_std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert row["patient_std_change"] == pytest.approx(0.075 - 0.1)
    assert "paired over seeds [0, 1]" in row["note"]
    unpaired = [r for r in runs if not (r.arm == "real+stedm" and r.seed == 1)]
    (row,) = headline_rows(unpaired, [6, 24], "real", ["real", "real+stedm"])
    assert row["gap_closed"] == pytest.approx(0.4) and row["gap_closed_seed_std"] is None
    assert "seeds differ" in row["note"]


def test_segmentation_table_over_seeds():
    rows = segmentation_rows([run(6, "real", 0, 0.5), run(6, "real", 1, 0.7), run(24, "real", 0, 0.9)], ARMS)
    assert rows[0]["dice_mean"] == pytest.approx(0.6)
    assert rows[0]["dice_seed_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    md = segmentation_markdown(rows)
    assert md[0]["Dice over seeds"].endswith("(2 seeds)") and md[1]["Dice over seeds"] == "1 seed"


# --------------------------------------------------------------------------- a tiny results folder
PATIENTS = ["P1", "P2", "P3", "P4"]
DICE = {  # budget -> arm -> per-patient Dice (budget 2 = small, 4 = large)
    2: {"real": [0.50, 0.60, 0.40, 0.70], "real+stedm": [0.60, 0.65, 0.55, 0.68],
        "real+stainaug": [0.55, 0.60, 0.45, 0.72]},
    4: {"real": [0.70, 0.80, 0.65, 0.85], "real+stedm": [0.72, 0.80, 0.70, 0.84],
        "real+stainaug": [0.70, 0.82, 0.66, 0.86]},
}


def metrics_json(budget: int, arm: str, seed: int, dice: list[float]) -> dict:
    iou = [d / (2 - d) for d in dice]
    patients = {p: {"dice": d, "iou": i, "tp": 10, "fp": 1, "fn": 1, "tn": 50, "n_pixels": 62, "slides": [f"{p}_s"]}
                for p, d, i in zip(PATIENTS, dice, iou, strict=True)}
    return {"budget": budget, "arm": arm, "seed": seed, "patients": patients,
            "slides": {f"{p}_s": {"patient_id": p, **v} for p, v in patients.items()},
            "aggregate": {"dice": summarize(dice, 2), "iou": summarize(iou, 2)},
            "pooled": {"dice": float(np.mean(dice)) + 0.01, "iou": float(np.mean(iou))}, "skipped_slides": []}


def make_results(root):
    for budget, arms in DICE.items():
        for arm, dice in arms.items():
            d = root / "segmentation" / f"budget~{budget}" / f"arm~{arm}" / "seed~0"
            (d / "overlays").mkdir(parents=True)
            (d / "model").mkdir()
            (d / "metrics.json").write_text(json.dumps(metrics_json(budget, arm, 0, dice)))
            for p in PATIENTS:
                Image.new("RGB", (90, 60), (200, 100, 100)).save(d / "overlays" / f"{p}_s.png")
            (d / "model" / "training.json").write_text(json.dumps({
                "seconds": 12.5, "history": [{"step": s, "loss": 1 / s} for s in range(1, 41)],
                "val_history": [{"step": 20, "dice": 0.5}, {"step": 40, "dice": 0.6}]}))
        m = root / "stedm" / f"budget~{budget}" / "model"
        m.mkdir(parents=True)
        (m / "stedm_run.json").write_text(json.dumps({"train_seconds": 100.0,
                                                      "history": [{"step": s, "loss": 0.5 / s} for s in range(1, 61)]}))
        syn = root / "synthesis" / f"budget~{budget}"
        syn.mkdir(parents=True)
        Image.fromarray(np.tile(np.arange(120, dtype=np.uint8), (80, 1))).convert("RGB").save(syn / "preview.png")
        g = zarr.open_group(str(syn / "synthetic.zarr"), mode="w")
        g.create_array("images", data=np.full((2, 16, 16, 3), 200, np.uint8))
        g.create_array("labels", data=np.ones((2, 16, 16), np.uint8))
        gen = root / "metrics" / "generation"
        gen.mkdir(parents=True, exist_ok=True)
        (gen / f"budget~{budget}.json").write_text(json.dumps({
            "budget": budget,
            "style": {"style_sampling": "multi_patch", "aggregation": "linear", "n_style": 4},
            "synthetic": {"path": str(syn / "synthetic.zarr"), "n_samples": 2, "tile_size": 16},
            "fid_is": {"status": "not computed", "reason": "no Inception weights at /nowhere/w.pth; place it"},
            "style_fidelity": {"status": "computed", "top1": 0.75, "chance": 0.25, "real_tiles_top1": 1.0,
                               "mean_own_distance": 2.0, "mean_other_distance": 4.0},
            "layout_fidelity": {"status": "computed", "dice_mean": 0.81,
                                "real_reference": {"dice_mean": 0.85}},
        }))
        b = root / "benchmarks" / "train_stedm"
        b.mkdir(parents=True, exist_ok=True)
        (b / f"budget~{budget}.tsv").write_text("s\th:m:s\tmax_rss\n100.5\t0:01:40\t900\n")
    ae = root / "autoencoder" / "model"
    ae.mkdir(parents=True)
    (ae / "stedm_autoencoder.json").write_text(json.dumps({"history": [{"step": s, "loss": 2 / s} for s in range(1, 30)]}))


def test_report_from_tiny_results(tmp_path):
    results = tmp_path / "results"
    make_results(results)
    cfg = {"results_dir": str(results), "splits": {"budgets": [2, 4]}}
    assert main(["report", "--config", json.dumps(cfg)]) == 0
    report = (results / "report.md").read_text()
    # headline: (mean(stedm@2) - mean(real@2)) / (mean(real@4) - mean(real@2))
    gap = (np.mean(DICE[2]["real+stedm"]) - np.mean(DICE[2]["real"])) / (
        np.mean(DICE[4]["real"]) - np.mean(DICE[2]["real"]))
    assert f"{100 * gap:.0f} %" in report
    for heading in ("Did STEDM help?", "For whom?", "Segmentation, every budget × arm", "Generation quality",
                    "At what cost?", "Test Dice per patient"):
        assert heading in report
    assert "FID/IS: **not computed** — no Inception weights at /nowhere/w.pth" in report
    assert "1 seed" in report and "real+stainaug" in report
    assert "better for 3, worse for 1" in report  # real+stedm vs real at budget 2: P4 0.70 -> 0.68
    assert "0.75 (0.25; 1.00)" in report  # style top-1 (chance; real tiles)
    assert "train_stedm" in report
    tables = results / "report" / "tables"
    for name in ("generation", "segmentation", "headline", "per_patient"):
        csv_text = (tables / f"{name}.csv").read_text()
        md_text = (tables / f"{name}.md").read_text()
        assert csv_text.count("\n") >= 2 and md_text.startswith("## ")
        assert md_text.split("\n", 3)[2] in report  # every table's header row is in report.md
    headline = (tables / "headline.csv").read_text().splitlines()
    assert len(headline) == 3 and headline[1].startswith("real+stedm")
    figures = results / "report" / "figures"
    names = ["per_patient_dice.png", "training_curves.png"] + [f"{k}_budget~{b}.png" for k in ("samples", "overlays")
                                                               for b in (2, 4)]
    for name in names:
        with Image.open(figures / name) as im:
            assert im.size[0] > 50 and np.asarray(im.convert("L")).std() > 0, name
    assert (figures / "samples_budget~2.png").read_bytes() == (
        results / "synthesis" / "budget~2" / "preview.png").read_bytes()
    seg = read_seg_metrics(results / "segmentation" / "budget~2" / "arm~real" / "seed~0" / "metrics.json")
    assert seg.dice_mean == pytest.approx(0.55) and seg.patients["P3"] == 0.4
    config = load_config({"results_dir": str(results)})
    mlflow.set_tracking_uri(tracking_uri(config))
    (run_,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if r.info.run_name == "report"]
    assert run_.data.metrics["gap_closed.real_stedm"] == pytest.approx(gap)


def test_report_says_what_is_missing(tmp_path):
    results = tmp_path / "results"
    cfg = {"results_dir": str(results), "splits": {"budgets": [2, 4]}, "tracking": {"enabled": False}}
    assert main(["report", "--config", json.dumps(cfg)]) == 0
    report = (results / "report.md").read_text()
    assert "not computed: no results for" in report and "Missing inputs" in report
    assert (results / "report" / "figures" / "overlays_budget~4.png").stat().st_size > 0


# --------------------------------------------------------------------------- the rules + snakemake --report
SNAKEFILE = """
from snakemake.utils import validate

validate(config, "{root}/schemas/config.schema.yaml", set_default=True)


include: "{root}/rules/common.smk"
include: "{root}/rules/report.smk"


rule all:
    input:
        REPORT_OUTPUTS,
    default_target: True
"""


@pytest.mark.slow
def test_rules_run_and_build_the_html_report(tmp_path):
    """evaluate_generation + make_report through Snakemake on a results folder whose upstream outputs
    exist already, then `snakemake --report`: every table and figure is in the HTML."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from stores import write_store

    from stedm.data.demo import demo_slide_ids
    from stedm.segmentation.model import SegModelConfig, build_model, save_model

    root = Path(__file__).resolve().parent.parent
    results = tmp_path / "results"
    make_results(results)
    config = {"results_dir": str(results), "cohort": {"demo": {"n_slides": 12}}, "splits": {"budgets": [2, 4]},
              "labels": {"classes": ["Background", "Stroma", "Tumor"]}, "tracking": {"enabled": True}}
    cfg = load_config(config)
    slides = demo_slide_ids(cfg.cohort.demo)
    for k, s in enumerate(slides):
        write_store(results / "tiles" / f"{s}.zarr", s, n=6, tile=32, seed=k, labels=k < 8)
    (results / "splits").mkdir()
    (results / "splits" / "splits.json").write_text(json.dumps({
        "budgets": {"2": slides[:2], "4": slides[:4]}, "train_pool": slides[:4], "val": slides[4:6],
        "test": slides[6:8], "style_pool": slides[8:]}))
    (results / "tracking.json").write_text("{}")
    for b in (2, 4):  # replace the fake synthetic stores by ones with provenance and 32 px tiles
        syn = results / "synthesis" / f"budget~{b}" / "synthetic.zarr"
        g = zarr.open_group(str(syn), mode="w", zarr_format=3)
        imgs = np.stack([np.asarray(zarr.open_group(str(results / "tiles" / f"{s}.zarr"))["images"][0])
                         for s in slides[8:]])
        g.create_array("images", data=imgs, chunks=(1, 32, 32, 3))
        g.create_array("labels", data=np.where(imgs[..., 0] > 130, 2, 1).astype(np.uint8), chunks=(1, 32, 32))
        g.create_array("style_slide", shape=(4,), chunks=(4,), dtype=str)
        g["style_slide"][:] = np.asarray(slides[8:])
        g.attrs.update({"tile_size": 32, "class_names": ["Background", "Stroma", "Tumor"], "ignore_index": 255})
    model = results / "segmentation" / "budget~4" / "arm~real" / "seed~0" / "model"
    seg_cfg = SegModelConfig.from_workflow(cfg.segmentation, cfg.labels, tile_size=32, tile_mpp=1.0)
    save_model(build_model(seg_cfg), seg_cfg, model)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(root=root))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path),
           "TORCH_HOME": str(tmp_path / "torch")}
    base = [str(bin_dir / "snakemake"), "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path),
            "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"]
    done = subprocess.run(base, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate_generation" in done.stderr and "make_report" in done.stderr
    gen = json.loads((results / "metrics" / "generation" / "budget~2.json").read_text())
    assert gen["fid_is"]["status"] == "not computed" and gen["layout_fidelity"]["status"] == "computed"
    html = tmp_path / "report.html"
    done = subprocess.run(base + ["--report", str(html)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = html.read_text()
    for name in ("report.md", "generation.csv", "segmentation.csv", "headline.csv", "per_patient.csv",
                 "per_patient_dice.png", "training_curves.png", "samples_budget~2.png", "overlays_budget~4.png",
                 "budget~2.png"):
        assert name in text, name


def test_gap_closed_undefined_for_a_gap_within_noise():
    # 0.964 vs 0.965 real: a 0.001 gap would turn a 0.077 Dice loss into "-7700 %"
    assert gap_closed(0.887, 0.964, 0.965) is None
    assert gap_closed(0.98, 0.90, 0.95) == pytest.approx(1.6)
