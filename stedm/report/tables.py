"""The report's tables: generation quality, segmentation per budget x arm, the headline gap closed.

Each table is a list of flat row dicts, written as CSV (numbers, empty where undefined, with a
`note` column saying why) and as Markdown (formatted `mean ± std`, "not computed", "1 seed").

Conventions:
- A segmentation run's score is its mean per-patient test Dice (`aggregate.dice.mean` of
  `metrics.json`); its spread across patients the population std (ddof 0) of the same file.
- Over seeds: mean of the per-seed values, and the sample std (ddof 1) of the per-seed means —
  the seeds are a sample of the training runs one could have drawn; one seed has no spread.
- Gap closed = (Dice(small, arm) − Dice(small, real)) / (Dice(large, real) − Dice(small, real))
  with small / large = the smallest / largest configured budget; undefined (never a number)
  when the two real baselines differ by less than GAP_EPS (0.01 Dice): no gap to close.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stedm.io import atomic_output, read_json

# A budget gap below 0.01 Dice is within patient-to-patient noise on any realistic test set:
# dividing by it turns noise into "-7000 % of the gap closed". Such a gap is reported as undefined.
GAP_EPS = 0.01
UNDEFINED_GAP = "undefined (no gap between budgets)"
NOT_COMPUTED = "not computed"


# --------------------------------------------------------------------------- reading (adapters)
@dataclass
class SegRun:
    """One evaluated segmentation model (`stedm evaluate-seg` metrics.json), as the report uses it."""

    budget: int
    arm: str
    seed: int
    dice_mean: float | None
    dice_std: float | None
    iou_mean: float | None
    iou_std: float | None
    dice_min: float | None
    worst_k_mean: float | None
    worst_k: int | None
    pooled_dice: float | None
    pooled_iou: float | None
    patients: dict[str, float | None] = field(default_factory=dict)  # per-patient Dice
    path: Path | None = None


def read_seg_metrics(path: str | Path) -> SegRun:
    """The one place that knows the keys of a segmentation metrics.json."""
    m = read_json(path)
    agg_d, agg_i = m["aggregate"]["dice"], m["aggregate"]["iou"]
    return SegRun(
        budget=int(m["budget"]), arm=str(m["arm"]), seed=int(m["seed"]),
        dice_mean=agg_d.get("mean"), dice_std=agg_d.get("std"), iou_mean=agg_i.get("mean"),
        iou_std=agg_i.get("std"), dice_min=agg_d.get("min"), worst_k_mean=agg_d.get("worst_k_mean"),
        worst_k=agg_d.get("worst_k"), pooled_dice=m["pooled"].get("dice"), pooled_iou=m["pooled"].get("iou"),
        patients={p: v.get("dice") for p, v in m["patients"].items()}, path=Path(path),
    )


# --------------------------------------------------------------------------- small numerics
def _vals(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_or_none(values: Sequence[float | None]) -> float | None:
    v = _vals(values)
    return float(np.mean(v)) if v else None


def seed_std(values: Sequence[float | None]) -> float | None:
    """Sample std (ddof 1) over seeds; None with fewer than two."""
    v = _vals(values)
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def gap_closed(dice_small_arm: float, dice_small_real: float, dice_large_real: float) -> float | None:
    """Share of the small→large budget gap closed by an arm; None = undefined (no gap)."""
    denominator = dice_large_real - dice_small_real
    if abs(denominator) < GAP_EPS:
        return None
    return (dice_small_arm - dice_small_real) / denominator


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def fmt_gap(value: float | None) -> str:
    return UNDEFINED_GAP if value is None else f"{100 * value:.0f} %"


# --------------------------------------------------------------------------- table 1: generation
def generation_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per generation-metrics JSON (`stedm evaluate-generation`)."""
    rows = []
    for r in sorted(results, key=lambda r: r["budget"]):
        fi, st, la = r["fid_is"], r["style_fidelity"], r["layout_fidelity"]
        ok_f, ok_s, ok_l = (b.get("status") == "computed" for b in (fi, st, la))
        ref = (la.get("real_reference") or {}) if ok_l else {}
        rows.append({
            "budget": r["budget"], "style_sampling": r["style"]["style_sampling"],
            "aggregation": r["style"]["aggregation"], "n_style": r["style"].get("n_style"),
            "fid": fi.get("fid") if ok_f else None, "is_mean": fi.get("is_mean") if ok_f else None,
            "is_std": fi.get("is_std") if ok_f else None, "is_real_mean": fi.get("is_real_mean") if ok_f else None,
            "fid_n_images": fi.get("n_images") if ok_f else None, "tile_size": r["synthetic"]["tile_size"],
            "fid_status": fi["status"], "fid_reason": fi.get("reason", ""),
            "style_top1": st.get("top1") if ok_s else None, "style_chance": st.get("chance") if ok_s else None,
            "style_real_tiles_top1": st.get("real_tiles_top1") if ok_s else None,
            "style_own_distance": st.get("mean_own_distance") if ok_s else None,
            "style_other_distance": st.get("mean_other_distance") if ok_s else None,
            "style_status": st["status"], "style_reason": st.get("reason", ""),
            "layout_dice": la.get("dice_mean") if ok_l else None,
            "layout_dice_real_tiles": ref.get("dice_mean"),
            "layout_status": la["status"], "layout_reason": la.get("reason", ""),
        })
    return rows


def generation_markdown(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        nc = NOT_COMPUTED
        out.append({
            "budget": str(r["budget"]), "style sampling": r["style_sampling"], "aggregation": r["aggregation"],
            "FID ↓": fmt(r["fid"], 2) if r["fid_status"] == "computed" else nc,
            "IS ↑ (real tiles)": (f"{fmt_pm(r['is_mean'], r['is_std'], 2)} ({fmt(r['is_real_mean'], 2)})"
                                  if r["fid_status"] == "computed" else nc),
            "style top-1 (chance; real tiles)": (
                f"{fmt(r['style_top1'], 2)} ({fmt(r['style_chance'], 2)}; {fmt(r['style_real_tiles_top1'], 2)})"
                if r["style_status"] == "computed" else nc),
            "style distance own / other": (f"{fmt(r['style_own_distance'], 2)} / {fmt(r['style_other_distance'], 2)}"
                                           if r["style_status"] == "computed" else nc),
            "layout Dice (real tiles)": (f"{fmt(r['layout_dice'])} ({fmt(r['layout_dice_real_tiles'])})"
                                         if r["layout_status"] == "computed" else nc),
        })
    return out


# --------------------------------------------------------------------------- table 2: segmentation
def group_runs(runs: list[SegRun]) -> dict[tuple[int, str], list[SegRun]]:
    groups: dict[tuple[int, str], list[SegRun]] = {}
    for r in sorted(runs, key=lambda r: (r.budget, r.arm, r.seed)):
        groups.setdefault((r.budget, r.arm), []).append(r)
    return groups


def segmentation_rows(runs: list[SegRun], arm_order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per budget x arm, aggregated over seeds."""
    order = {a: k for k, a in enumerate(arm_order)}
    rows = []
    for (budget, arm), group in sorted(group_runs(runs).items(),
                                       key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])):
        rows.append({
            "budget": budget, "arm": arm, "n_seeds": len(group), "seeds": ";".join(str(r.seed) for r in group),
            "n_patients": max(len(r.patients) for r in group),
            "dice_mean": mean_or_none([r.dice_mean for r in group]),
            "dice_patient_std": mean_or_none([r.dice_std for r in group]),
            "dice_seed_std": seed_std([r.dice_mean for r in group]),
            "iou_mean": mean_or_none([r.iou_mean for r in group]),
            "iou_patient_std": mean_or_none([r.iou_std for r in group]),
            "iou_seed_std": seed_std([r.iou_mean for r in group]),
            "pooled_dice": mean_or_none([r.pooled_dice for r in group]),
            "pooled_iou": mean_or_none([r.pooled_iou for r in group]),
            "worst_patient_dice": mean_or_none([r.dice_min for r in group]),
            "worst_k": group[0].worst_k,
            "worst_k_mean_dice": mean_or_none([r.worst_k_mean for r in group]),
        })
    return rows


def _over_seeds(mean: float | None, std: float | None, n: int) -> str:
    return "1 seed" if n == 1 else f"{fmt_pm(mean, std)} ({n} seeds)"


def segmentation_markdown(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{
        "budget": str(r["budget"]), "arm": r["arm"],
        "Dice per patient (mean ± std)": fmt_pm(r["dice_mean"], r["dice_patient_std"]),
        "IoU per patient (mean ± std)": fmt_pm(r["iou_mean"], r["iou_patient_std"]),
        "Dice over seeds": _over_seeds(r["dice_mean"], r["dice_seed_std"], r["n_seeds"]),
        "pooled Dice": fmt(r["pooled_dice"]),
        "worst patient": fmt(r["worst_patient_dice"]),
        f"worst-{r['worst_k']} mean": fmt(r["worst_k_mean_dice"]),
        "patients": str(r["n_patients"]),
    } for r in rows]


# --------------------------------------------------------------------------- table 3: headline
def headline_rows(runs: list[SegRun], budgets: Sequence[int], real_arm: str,
                  arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """Gap closed per non-real arm between the smallest and the largest budget."""
    small, large = min(budgets), max(budgets)
    groups = group_runs(runs)
    by_seed = {key: {r.seed: r for r in group} for key, group in groups.items()}
    base_s, base_l = by_seed.get((small, real_arm), {}), by_seed.get((large, real_arm), {})
    rows = []
    for arm in [a for a in arm_order if a != real_arm]:
        arm_s = by_seed.get((small, arm), {})
        row: dict[str, Any] = {"arm": arm, "small_budget": small, "large_budget": large}
        if not arm_s or not base_s or not base_l:
            missing = [f"budget {b} arm {a}" for b, a, d in ((small, arm, arm_s), (small, real_arm, base_s),
                                                             (large, real_arm, base_l)) if not d]
            rows.append(row | {"gap_closed": None, "note": f"not computed: no results for {', '.join(missing)}"})
            continue
        d_arm = mean_or_none([r.dice_mean for r in arm_s.values()])
        d_small = mean_or_none([r.dice_mean for r in base_s.values()])
        d_large = mean_or_none([r.dice_mean for r in base_l.values()])
        gap = None if None in (d_arm, d_small, d_large) else gap_closed(d_arm, d_small, d_large)
        seeds = sorted(set(arm_s) & set(base_s) & set(base_l))
        paired = set(arm_s) == set(base_s) == set(base_l)
        per_seed = [gap_closed(arm_s[s].dice_mean, base_s[s].dice_mean, base_l[s].dice_mean)
                    if None not in (arm_s[s].dice_mean, base_s[s].dice_mean, base_l[s].dice_mean) else None
                    for s in seeds] if paired else []
        defined = [g for g in per_seed if g is not None]
        if small == large:
            note = f"{UNDEFINED_GAP}: only one budget ({small}) configured"
        elif gap is None:
            diff = "?" if None in (d_small, d_large) else f"{d_large - d_small:+.3f}"
            note = (f"{UNDEFINED_GAP}: Dice real {large} − real {small} = {diff}, below {GAP_EPS} "
                    "— the smaller budget already performs like the larger one")
        elif not paired:
            note = (f"seeds differ between runs ({sorted(arm_s)}, {sorted(base_s)}, {sorted(base_l)}): "
                    "gap from the seed means, no per-seed spread")
        elif len(seeds) == 1:
            note = "1 seed: no spread over seeds"
        else:
            note = (f"paired over seeds {seeds}" + (f"; undefined for {len(per_seed) - len(defined)} seed(s)"
                                                      if len(defined) < len(per_seed) else ""))
        std_arm = mean_or_none([r.dice_std for r in arm_s.values()])
        std_real = mean_or_none([r.dice_std for r in base_s.values()])
        arm_l = by_seed.get((large, arm), {})
        d_arm_l = mean_or_none([r.dice_mean for r in arm_l.values()]) if arm_l else None
        rows.append(row | {
            "dice_small_real": d_small, "dice_small_arm": d_arm, "dice_large_real": d_large,
            "gap_closed": gap, "gap_closed_seed_mean": mean_or_none(defined) if paired else None,
            "gap_closed_seed_std": seed_std(defined) if paired else None,
            "gap_closed_per_seed": ";".join("" if g is None else f"{g:.6g}" for g in per_seed),
            "patient_std_small_real": std_real, "patient_std_small_arm": std_arm,
            "patient_std_change": None if None in (std_arm, std_real) else std_arm - std_real,
            "dice_large_arm": d_arm_l,
            "dice_change_at_large": None if None in (d_arm_l, d_large) else d_arm_l - d_large,
            "note": note,
        })
    return rows


def headline_markdown(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        if "dice_small_real" not in r:
            out.append({"arm": r["arm"], "gap closed": r["note"]})
            continue
        gap = fmt_gap(r["gap_closed"])
        if r["gap_closed"] is not None and r["gap_closed_seed_std"] is not None:
            gap += f" (seeds: {100 * r['gap_closed_seed_mean']:.0f} ± {100 * r['gap_closed_seed_std']:.0f} %)"
        change = r["patient_std_change"]
        out.append({
            "arm": r["arm"],
            f"Dice {r['small_budget']} real": fmt(r["dice_small_real"]),
            f"Dice {r['small_budget']} + arm": fmt(r["dice_small_arm"]),
            f"Dice {r['large_budget']} real": fmt(r["dice_large_real"]),
            "gap closed": gap,
            "Δ between-patient std": "–" if change is None else f"{change:+.3f}",
            f"Δ Dice at {r['large_budget']}": "–" if r["dice_change_at_large"] is None
            else f"{r['dice_change_at_large']:+.3f}",
            "note": r["note"],
        })
    return out


# --------------------------------------------------------------------------- per-patient table
def per_patient_dice(runs: list[SegRun]) -> dict[tuple[int, str], dict[str, float | None]]:
    """(budget, arm) -> patient -> Dice averaged over seeds."""
    out = {}
    for key, group in group_runs(runs).items():
        patients = sorted({p for r in group for p in r.patients})
        out[key] = {p: mean_or_none([r.patients.get(p) for r in group]) for p in patients}
    return out


def per_patient_rows(runs: list[SegRun], arm_order: Sequence[str]) -> list[dict[str, Any]]:
    table = per_patient_dice(runs)
    keys = sorted(table, key=lambda k: (k[0], list(arm_order).index(k[1]) if k[1] in arm_order else 99))
    patients = sorted({p for d in table.values() for p in d})
    return [{"patient": p, **{f"budget~{b}/arm~{a}": table[(b, a)].get(p) for b, a in keys}} for p in patients]


# --------------------------------------------------------------------------- writing
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(r.get(k)) for k in columns} for r in rows)


def markdown_table(rows: list[dict[str, Any]], empty: str = "_no results_") -> str:
    if not rows:
        return empty + "\n"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(title: str, rows: list[dict[str, Any]], path: str | Path, notes: str = "") -> None:
    text = f"## {title}\n\n{markdown_table(rows)}" + (f"\n{notes}\n" if notes else "")
    with atomic_output(path) as tmp:
        tmp.write_text(text)
