"""Foreground overlap metrics: confusion counts, Dice/IoU, per-patient pooling, aggregates.

Conventions (nnU-Net's, and the paper's evaluation re-implemented from its confusion matrices):
- Binary foreground = the configured foreground classes vs. everything else; pixels whose ground
  truth is `ignore_index` count nowhere (neither as error nor as agreement).
- Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN); both NaN when ground truth and
  prediction are empty (nothing to get right or wrong), 0 when only one of them is.
- A patient's score pools the counts of all its slides (sum TP/FP/FN, then Dice), so a large
  slide weighs more than a small one of the same patient; the cohort aggregates are over
  patients, with NaN patients left out (`nanmean`) and counted in `n_nan`.
- Spread across patients is the population standard deviation (ddof = 0): the test patients are
  the whole population the mean describes, and it is what `np.std` gives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def dice_score(tp: float, fp: float, fn: float) -> float:
    """2TP / (2TP + FP + FN); NaN when the denominator is 0 (both masks empty)."""
    denominator = 2 * tp + fp + fn
    return float("nan") if denominator == 0 else 2 * tp / denominator


def iou_score(tp: float, fp: float, fn: float) -> float:
    """TP / (TP + FP + FN); NaN when both masks are empty."""
    denominator = tp + fp + fn
    return float("nan") if denominator == 0 else tp / denominator


@dataclass
class Counts:
    """Binary foreground confusion counts over the non-ignored pixels."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n_pixels(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def dice(self) -> float:
        return dice_score(self.tp, self.fp, self.fn)

    @property
    def iou(self) -> float:
        return iou_score(self.tp, self.fp, self.fn)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def as_dict(self) -> dict[str, Any]:
        return {"dice": self.dice, "iou": self.iou, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tn": self.tn, "n_pixels": self.n_pixels}


def foreground_counts(pred_fg: np.ndarray, labels: np.ndarray, foreground: Sequence[int],
                      ignore_index: int) -> Counts:
    """Counts of a predicted foreground mask against a class-index label map of the same shape.

    Args:
        pred_fg: bool, True = predicted foreground.
        labels: ground-truth class indices; `ignore_index` pixels are excluded.
        foreground: the class indices that count as foreground.
    """
    pred_fg = np.asarray(pred_fg, dtype=bool)
    labels = np.asarray(labels)
    if pred_fg.shape != labels.shape:
        raise ValueError(f"prediction {pred_fg.shape} and labels {labels.shape} differ in shape")
    valid = labels != ignore_index
    gt_fg = np.isin(labels, np.asarray(foreground, dtype=labels.dtype))
    tp = int(np.count_nonzero(pred_fg & gt_fg))  # gt_fg implies valid
    fn = int(np.count_nonzero(gt_fg)) - tp
    pred_valid = int(np.count_nonzero(pred_fg & valid))
    n_valid = int(np.count_nonzero(valid))
    fp = pred_valid - tp
    return Counts(tp=tp, fp=fp, fn=fn, tn=n_valid - tp - fp - fn)


def foreground_counts_torch(pred: torch.Tensor, target: torch.Tensor, foreground: Sequence[int],
                            ignore_index: int) -> Counts:
    """`foreground_counts` for class-index tensors (predicted classes, target classes) on any device."""
    fg = torch.as_tensor(list(foreground), device=pred.device)
    valid = target != ignore_index
    pred_fg = torch.isin(pred, fg) & valid
    gt_fg = torch.isin(target, fg) & valid
    tp = int((pred_fg & gt_fg).sum())
    fp = int(pred_fg.sum()) - tp
    fn = int(gt_fg.sum()) - tp
    return Counts(tp=tp, fp=fp, fn=fn, tn=int(valid.sum()) - tp - fp - fn)


def pool_by_patient(slide_counts: Mapping[str, Counts], patient_of: Mapping[str, str]) -> dict[str, Counts]:
    """Sum each patient's slide counts (the patient's Dice is computed from the sums)."""
    pooled: dict[str, Counts] = {}
    for slide_id, counts in slide_counts.items():
        patient = patient_of[slide_id]
        pooled[patient] = pooled.get(patient, Counts()) + counts
    return dict(sorted(pooled.items()))


def summarize(values: Sequence[float], worst_k: int) -> dict[str, float | int]:
    """Aggregates of per-patient scores, NaNs left out.

    Returns:
        mean, std (population, ddof=0), min, max, median, worst_k_mean (mean of the k lowest, k
        capped at the number of non-NaN values), worst_k, n (non-NaN values), n_nan.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    finite = np.sort(arr[~np.isnan(arr)])
    k = min(int(worst_k), finite.size)
    nan = float("nan")
    return {
        "mean": float(finite.mean()) if finite.size else nan,
        "std": float(finite.std(ddof=0)) if finite.size else nan,
        "min": float(finite[0]) if finite.size else nan,
        "max": float(finite[-1]) if finite.size else nan,
        "median": float(np.median(finite)) if finite.size else nan,
        "worst_k_mean": float(finite[:k].mean()) if k else nan,
        "worst_k": k,
        "n": int(finite.size),
        "n_nan": int(arr.size - finite.size),
    }


def json_float(value: float) -> float | None:
    """NaN -> None, so metrics.json stays strict JSON (`null` where a score is undefined)."""
    return None if isinstance(value, float) and math.isnan(value) else value
