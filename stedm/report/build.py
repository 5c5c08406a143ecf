"""`stedm report`: tables, figures and a one-screen `report.md` from every stage's results.

    stedm report --results-dir results --config cfg.json --out-dir results/report --summary results/report.md

Reads (paths of the workflow; budgets, arms and seeds from the config):
`segmentation/budget~<b>/arm~<arm>/seed~<s>/{metrics.json, overlays/, model/training.json}`,
`metrics/generation/budget~<b>.json`, `synthesis/budget~<b>/{preview.png, synthetic.zarr}`,
`stedm/budget~<b>/model/stedm_run.json`, `autoencoder/model/stedm_autoencoder.json`,
`benchmarks/**/*.tsv` (Snakemake `benchmark:` files, column `s`).

Writes `<out-dir>/tables/{generation,segmentation,headline,per_patient}.{csv,md}`,
`<out-dir>/figures/{per_patient_dice,training_curves}.png`,
`<out-dir>/figures/{samples,overlays}_budget~<b>.png` and the summary. Missing inputs are listed
in the summary instead of failing the stage, and a metric that was not computed says why.
One MLflow run "report" logs the headline numbers and the summary.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from stedm.config import Config
from stedm.io import atomic_output, read_json
from stedm.metrics import ReportConfig, load_stage_config
from stedm.report import figures
from stedm.report.tables import (
    SegRun,
    fmt,
    fmt_gap,
    generation_markdown,
    generation_rows,
    headline_markdown,
    headline_rows,
    markdown_table,
    per_patient_dice,
    per_patient_rows,
    read_seg_metrics,
    segmentation_markdown,
    segmentation_rows,
    write_csv,
    write_markdown,
)
from stedm.tracking import start_run, tracking_uri

log = logging.getLogger(__name__)

TABLES = ("generation", "segmentation", "headline", "per_patient")
CHANGE_EPS = 0.005  # per-patient Dice changes within ±0.005 count as unchanged
SYNTHESIS_RULES = ("train_autoencoder", "train_stedm", "select_style_queries", "generate_synthetic",
                   "merge_synthetic")


def real_arm(config: Config) -> str:
    """The baseline arm: `real`, else the first arm without synthetic data or stain augmentation."""
    arms = config.segmentation.arms
    if "real" in arms:
        return "real"
    plain = [a for a, c in arms.items() if c.synthetic_fraction == 0 and not c.stain_augmentation]
    return plain[0] if plain else next(iter(arms))


def seg_dir(results: Path, budget: int, arm: str, seed: int) -> Path:
    return results / "segmentation" / f"budget~{budget}" / f"arm~{arm}" / f"seed~{seed}"


def report_files(out_dir: Path, budgets: list[int]) -> dict[str, Path]:
    """Every file the stage writes under `out_dir` (the rule declares the same names)."""
    files = {f"{t}.{ext}": out_dir / "tables" / f"{t}.{ext}" for t in TABLES for ext in ("csv", "md")}
    files["per_patient_dice.png"] = out_dir / "figures" / "per_patient_dice.png"
    files["training_curves.png"] = out_dir / "figures" / "training_curves.png"
    for b in budgets:
        for kind in ("samples", "overlays"):
            files[f"{kind}_budget~{b}.png"] = out_dir / "figures" / f"{kind}_budget~{b}.png"
    return files


# --------------------------------------------------------------------------- collecting
def collect_seg(config: Config, results: Path) -> tuple[list[SegRun], list[str]]:
    runs, missing = [], []
    for b in sorted(set(config.splits.budgets)):
        for arm, arm_cfg in config.segmentation.arms.items():
            if not arm_cfg.runs_for(b):
                continue
            for seed in config.segmentation.seeds:
                path = seg_dir(results, b, arm, seed) / "metrics.json"
                if path.is_file():
                    runs.append(read_seg_metrics(path))
                else:
                    missing.append(str(path))
    return runs, missing


def read_benchmarks(results: Path) -> list[dict[str, Any]]:
    """One record per Snakemake benchmark TSV: rule (first folder or file stem), budget, seconds."""
    records = []
    root = results / "benchmarks"
    for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        rel = tsv.relative_to(root)
        with open(tsv, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        seconds = [float(r["s"]) for r in rows if r.get("s") not in (None, "", "NA")]
        if not seconds:
            continue
        budget = re.search(r"budget~(\d+)", str(rel))
        arm = re.search(r"arm~([^/]+?)(?:/|\.tsv|$)", str(rel))
        records.append({"rule": rel.parts[0].removesuffix(".tsv"), "job": str(rel.with_suffix("")),
                        "budget": int(budget.group(1)) if budget else None,
                        "arm": arm.group(1) if arm else None, "seconds": float(np.mean(seconds))})
    return records


def cost_rows(bench: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rules: dict[str, list[float]] = {}
    for r in bench:
        rules.setdefault(r["rule"], []).append(r["seconds"])
    return [{"rule": rule, "jobs": len(s), "total_s": round(sum(s), 1), "max_job_s": round(max(s), 1)}
            for rule, s in sorted(rules.items(), key=lambda kv: -sum(kv[1]))]


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else (f"{seconds / 60:.1f} min" if seconds >= 60
                                                            else f"{seconds:.0f} s")


# --------------------------------------------------------------------------- the summary text
def _who(per_patient: dict, budget: int, base: str, arms: list[str]) -> list[str]:
    lines = []
    for arm in arms:
        a, r = per_patient.get((budget, arm)), per_patient.get((budget, base))
        if not a or not r:
            continue
        deltas = {p: a[p] - r[p] for p in a if a.get(p) is not None and r.get(p) is not None}
        if not deltas:
            continue
        up = sorted((p for p, d in deltas.items() if d > CHANGE_EPS), key=lambda p: -deltas[p])
        down = sorted((p for p, d in deltas.items() if d < -CHANGE_EPS), key=lambda p: deltas[p])
        same = len(deltas) - len(up) - len(down)
        line = (f"- **{arm}** vs {base} at budget {budget}: better for {len(up)}, worse for {len(down)}, "
                f"unchanged (|Δ| ≤ {CHANGE_EPS}) for {same} of {len(deltas)} test patients")
        if up:
            line += f"; largest gain {up[0]} {deltas[up[0]]:+.3f}"
        if down:
            line += f"; largest loss {down[0]} {deltas[down[0]]:+.3f}"
        worst_real = min(r, key=lambda p: r[p] if r[p] is not None else np.inf)
        if worst_real in deltas:
            line += f"; the weakest patient under {base} ({worst_real}, {r[worst_real]:.3f}) {deltas[worst_real]:+.3f}"
        lines.append(line + ".")
    return lines


def _headline_sentences(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if "dice_small_real" not in r:
            out.append(f"- **{r['arm']}**: {r['note']}.")
            continue
        s, lg = r["small_budget"], r["large_budget"]
        out.append(f"- **{r['arm']}**: mean per-patient Dice {fmt(r['dice_small_arm'])} with {s} annotated "
                   f"slides vs {fmt(r['dice_small_real'])} real only ({lg} slides real: "
                   f"{fmt(r['dice_large_real'])}) → gap closed: **{fmt_gap(r['gap_closed'])}** ({r['note']}).")
    return out


def _status_lines(gen_results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for g in gen_results:
        for key, name in (("fid_is", "FID/IS"), ("style_fidelity", "style fidelity"),
                          ("layout_fidelity", "layout fidelity")):
            if g[key].get("status") != "computed":
                lines.append(f"- budget {g['budget']} {name}: **not computed** — {g[key].get('reason', '')}")
    return lines


def summary_text(ctx: dict[str, Any]) -> str:
    """report.md: the headline first, then who it helped, the details, the cost and the files."""
    c: Config = ctx["config"]
    budgets, base = ctx["budgets"], ctx["real_arm"]
    style = ctx["gen_results"][0]["style"] if ctx["gen_results"] else {
        "style_sampling": c.synthesis.style_sampling or c.stedm.style_sampling, "aggregation": c.stedm.aggregation}
    others = [a for a in ctx["arms"] if a != base]
    who = [line for b in budgets for line in _who(ctx["per_patient"], b, base, others)]
    cost = [{k: str(v) for k, v in r.items()} for r in ctx["cost"]]
    out_dir = ctx["out_dir"]
    lines = [
        f"# STEDM results ({c.results_dir})",
        "",
        f"Cohort `{c.cohort.source}`; annotation budgets {budgets} slides; arms {ctx['arms']}; seeds "
        f"{list(c.segmentation.seeds)}; style sampling `{style['style_sampling']}`, aggregation "
        f"`{style['aggregation']}`; tiles {c.tiling.tile_size} px at {c.tiling.mpp} µm/px. Test scores are "
        "whole-slide Dice per test patient, averaged over patients (and seeds).",
        "",
        f"## Did STEDM help? (budget {min(budgets)} → {max(budgets)})",
        "",
        markdown_table(headline_markdown(ctx["headline"])),
        *_headline_sentences(ctx["headline"]),
        "",
        "## For whom? (per-patient change against the real-only arm)",
        "",
        *(who or ["- no per-patient results"]),
        "",
        "## Segmentation, every budget × arm",
        "",
        markdown_table(segmentation_markdown(ctx["seg_rows"])),
        "## Generation quality",
        "",
        markdown_table(generation_markdown(ctx["gen_rows"])),
        *_status_lines(ctx["gen_results"]),
        "",
        "## At what cost? (wall-clock per rule, Snakemake benchmarks)",
        "",
        markdown_table(cost, "_no benchmark files (run through Snakemake)_"),
        *ctx["cost_lines"],
        "",
        "## Test Dice per patient (mean over seeds)",
        "",
        markdown_table(ctx["per_patient_md"]),
        "## Files",
        "",
        f"- tables: `{out_dir}/tables/` (CSV + Markdown); figures: `{out_dir}/figures/`",
        "- HTML report with every table and figure: `snakemake --report report.html`",
        f"- runs and metrics: `mlflow ui --backend-store-uri {ctx['tracking_uri']} --host 127.0.0.1` "
        "(then http://127.0.0.1:5000)",
    ]
    missing = ctx["missing"]
    if missing:
        listed = ", ".join(f"`{m}`" for m in missing[:10]) + (" …" if len(missing) > 10 else "")
        lines += ["", f"**Missing inputs ({len(missing)}):** {listed}"]
    return "\n".join(lines) + "\n"


def _cost_lines(config: Config, results: Path, bench: list[dict[str, Any]], seg: dict) -> list[str]:
    lines = []
    ae = sum(r["seconds"] for r in bench if r["rule"] == "train_autoencoder") or None
    for b in sorted(set(config.splits.budgets)):
        parts = {rule: sum(r["seconds"] for r in bench if r["rule"] == rule and r["budget"] == b)
                 for rule in SYNTHESIS_RULES[1:]}
        run = results / "stedm" / f"budget~{b}" / "model" / "stedm_run.json"
        if not parts["train_stedm"] and run.is_file():
            parts["train_stedm"] = float(read_json(run).get("train_seconds") or 0.0)
        seg_s = [info.get("seconds") for (bb, _), info in seg.items() if bb == b and info.get("seconds")]
        if any(parts.values()) or seg_s:
            gen = parts["select_style_queries"] + parts["generate_synthetic"] + parts["merge_synthetic"] or None
            lines.append(f"- budget {b}: synthetic data = STEDM training {_hms(parts['train_stedm'] or None)} + generation "
                         f"{_hms(gen)} (+ autoencoder {_hms(ae)}, shared by all budgets); one segmentation model "
                         f"trains in {_hms(float(np.mean(seg_s)) if seg_s else None)} (first seed, mean over arms).")
    return lines


# --------------------------------------------------------------------------- the stage
def build_report(config: Config, report: ReportConfig, results: Path, out_dir: Path,
                 summary: Path) -> dict[str, Any]:
    """Write every table, figure and the summary; returns the context the summary was built from."""
    budgets = sorted(set(config.splits.budgets))
    arms = list(config.segmentation.arms)
    base = real_arm(config)
    files = report_files(out_dir, budgets)
    runs, missing = collect_seg(config, results)
    gen_results = []
    for b in budgets:
        path = results / "metrics" / "generation" / f"budget~{b}.json"
        if path.is_file():
            gen_results.append(read_json(path))
        else:
            missing.append(str(path))
    seg_rows = segmentation_rows(runs, arms)
    gen_rows = generation_rows(gen_results)
    head = headline_rows(runs, budgets, base, arms)
    pp_rows = per_patient_rows(runs, arms)
    pp_md = [{k: (fmt(v) if isinstance(v, float) else ("–" if v is None else v)) for k, v in r.items()}
             for r in pp_rows]
    for name, rows, md, title in (
        ("generation", gen_rows, generation_markdown(gen_rows), "Generation quality per budget and style setting"),
        ("segmentation", seg_rows, segmentation_markdown(seg_rows), "Test segmentation per budget and arm"),
        ("headline", head, headline_markdown(head), "Share of the budget gap closed"),
        ("per_patient", pp_rows, pp_md, "Test Dice per patient"),
    ):
        write_csv(rows, files[f"{name}.csv"])
        write_markdown(title, md, files[f"{name}.md"])

    per_patient = per_patient_dice(runs)
    figures.plot_per_patient(per_patient, budgets, arms, files["per_patient_dice.png"])
    first = config.segmentation.seeds[0]
    seg_training = {}
    for b in budgets:
        for arm in arms:
            path = seg_dir(results, b, arm, first) / "model" / "training.json"
            if path.is_file():
                seg_training[(b, arm)] = read_json(path)
    stedm_hist = {}
    for b in budgets:
        path = results / "stedm" / f"budget~{b}" / "model" / "stedm_run.json"
        if path.is_file():
            stedm_hist[b] = read_json(path).get("history", [])
    ae_path = results / "autoencoder" / "model" / "stedm_autoencoder.json"
    ae_hist = read_json(ae_path).get("history", []) if ae_path.is_file() else []
    figures.plot_training_curves(stedm_hist, ae_hist, seg_training, files["training_curves.png"])
    for b in budgets:
        syn = results / "synthesis" / f"budget~{b}"
        figures.sample_grid(syn / "preview.png", files[f"samples_budget~{b}.png"], syn / "synthetic.zarr",
                            results / "tiles")
        rows = []
        for arm in arms:
            overlays = seg_dir(results, b, arm, first) / "overlays"
            if config.segmentation.arms[arm].runs_for(b):
                rows.append((f"{arm} (seed {first})", sorted(overlays.glob("*.png"))[: report.n_overlays]))
        figures.overlay_sheet(rows, files[f"overlays_budget~{b}.png"])

    bench = read_benchmarks(results)
    ctx = {"config": config, "budgets": budgets, "arms": arms, "real_arm": base, "headline": head,
           "seg_rows": seg_rows, "gen_rows": gen_rows, "gen_results": gen_results, "per_patient": per_patient,
           "per_patient_md": pp_md, "cost": cost_rows(bench),
           "cost_lines": _cost_lines(config, results, bench, seg_training), "missing": missing,
           "out_dir": out_dir, "tracking_uri": tracking_uri(config)}
    with atomic_output(summary) as tmp:
        tmp.write_text(summary_text(ctx))
    log.info("wrote %s, %d tables and %d figures under %s (%d segmentation runs, %d generation results, "
             "%d missing inputs)", summary, len(TABLES), 2 + 2 * len(budgets), out_dir, len(runs),
             len(gen_results), len(missing))
    return ctx


def _metric_key(text: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", type=Path, default=None, help="results folder (default: results_dir)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")
    parser.add_argument("--out-dir", type=Path, default=None, help="tables/ and figures/ (default <results>/report)")
    parser.add_argument("--summary", type=Path, default=None, help="report.md (default <results>/report.md)")


def run(args: argparse.Namespace) -> None:
    config, report = load_stage_config(args.config)
    results = args.results_dir or Path(config.results_dir)
    out_dir = args.out_dir or results / "report"
    summary = args.summary or results / "report.md"
    start = time.perf_counter()
    params = {"budgets": list(config.splits.budgets), "arms": list(config.segmentation.arms),
              "seeds": list(config.segmentation.seeds), "stedm": config.section("stedm"),
              "synthesis": config.section("synthesis")}
    with start_run(config, "report", params=params) as run_:
        ctx = build_report(config, report, results, out_dir, summary)
        metrics = {}
        for r in ctx["headline"]:
            arm = _metric_key(r["arm"])
            for key in ("gap_closed", "dice_small_arm", "dice_small_real", "dice_large_real", "patient_std_change"):
                if r.get(key) is not None:
                    metrics[f"{key}.{arm}"] = r[key]
        for r in ctx["seg_rows"]:
            metrics[f"dice_mean.budget_{r['budget']}.{_metric_key(r['arm'])}"] = r["dice_mean"]
        for r in ctx["gen_rows"]:
            for key in ("fid", "is_mean", "style_top1", "layout_dice"):
                if r.get(key) is not None:
                    metrics[f"{key}.budget_{r['budget']}"] = r[key]
        run_.log_metrics(metrics)
        run_.log_artifact(summary)
        for path in sorted((out_dir / "tables").glob("*.csv")):
            run_.log_artifact(path)
    log.info("report built in %.1f s", time.perf_counter() - start)
