"""Layout fidelity: does a synthetic image show the layout it was conditioned on?

A segmentation model trained on real tiles only (the `real` arm of the largest budget, first
seed) segments each synthetic image; its binary foreground prediction is compared with the
image's stored label tile (the conditioning layout) by Dice, ignore pixels excluded — the
"segmentation consistency" check used for layout-conditioned generators. The same model's Dice on
held-out real annotated tiles (validation + test slides) is reported beside it as the ceiling: a
synthetic set that matches its layouts as well as real tiles match their annotations scores alike.

Conventions are `stedm.segmentation.metrics`': Dice NaN when layout and prediction are both
empty; per-image scores averaged with NaNs left out (and counted), plus the pooled Dice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stedm.segmentation.metrics import Counts, foreground_counts

log = logging.getLogger(__name__)

# uint8 (B, T, T, 3) images -> bool (B, T, T) predicted foreground
Segmenter = Callable[[np.ndarray], np.ndarray]


def load_segmenter(model_dir: str | Path, device: str | torch.device | None = None) -> Segmenter:
    """The trained segmentation model in `model_dir` as a foreground predictor.

    The single place the metrics call into `stedm.segmentation.model`: inputs scaled to [-1, 1]
    as in training, foreground = the model's foreground output channels.
    """
    from stedm.segmentation.model import load_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_model(model_dir, device)
    foreground = torch.as_tensor(list(cfg.foreground), device=device)
    lo, hi = cfg.input_range

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
        x = x / 255.0 * (hi - lo) + lo
        return torch.isin(model(x).argmax(1), foreground).cpu().numpy()

    return predict


def _dice_of(predict: Segmenter, images: Any, labels: Any, indices: Sequence[int], foreground: Sequence[int],
             ignore_index: int, batch_size: int) -> tuple[np.ndarray, Counts]:
    scores, total = [], Counts()
    for lo in range(0, len(indices), batch_size):
        idx = [int(i) for i in indices[lo : lo + batch_size]]
        pred = predict(np.stack([np.asarray(images[i]) for i in idx]))
        for p, i in zip(pred, idx, strict=True):
            counts = foreground_counts(p, np.asarray(labels[i]), foreground, ignore_index)
            scores.append(counts.dice)
            total = total + counts
    return np.asarray(scores, dtype=np.float64), total


def _summary(scores: np.ndarray, total: Counts) -> dict[str, Any]:
    finite = scores[~np.isnan(scores)]
    return {
        "dice_mean": float(finite.mean()) if finite.size else None,
        "dice_std": float(finite.std()) if finite.size else None,
        "dice_pooled": None if np.isnan(total.dice) else float(total.dice),
        "n_images": int(scores.size),
        "n_both_empty": int(scores.size - finite.size),
    }


def layout_fidelity(
    predict: Segmenter,
    images: Any,
    labels: Any,
    indices: Sequence[int],
    *,
    foreground: Sequence[int],
    ignore_index: int,
    reference: tuple[Any, Any, Sequence[int]] | list[tuple[Any, Any, Sequence[int]]] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Dice of the segmenter's prediction on each synthetic image against its layout.

    Args:
        predict: foreground predictor (`load_segmenter`, or a stand-in in tests).
        images, labels: (N, T, T, 3) uint8 images and (N, T, T) class-index layouts.
        indices: the synthetic samples to evaluate.
        foreground: layout class indices that count as foreground.
        reference: real (images, labels, indices) source(s) for the ceiling; None = skip.

    Returns:
        `{"status": "computed", "dice_mean", "dice_std", "dice_pooled", "n_images",
        "n_both_empty", "per_image_dice", "real_reference": {...} | None}`.
    """
    scores, total = _dice_of(predict, images, labels, indices, foreground, ignore_index, batch_size)
    result = {"status": "computed", **_summary(scores, total),
              "per_image_dice": [None if np.isnan(s) else round(float(s), 6) for s in scores]}
    result["real_reference"] = None
    if reference:
        sources = reference if isinstance(reference, list) else [reference]
        all_scores, all_total = [], Counts()
        for ref_images, ref_labels, ref_idx in sources:
            s, t = _dice_of(predict, ref_images, ref_labels, ref_idx, foreground, ignore_index, batch_size)
            all_scores.append(s)
            all_total = all_total + t
        if all_scores:
            result["real_reference"] = _summary(np.concatenate(all_scores), all_total)
    ref = result["real_reference"] or {}
    log.info("layout fidelity: Dice %s per image (pooled %s) on %d synthetic images; real tiles %s",
             result["dice_mean"], result["dice_pooled"], result["n_images"], ref.get("dice_mean"))
    return result
