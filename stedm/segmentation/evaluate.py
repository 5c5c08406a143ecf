"""`stedm evaluate-seg`: whole-slide Dice/IoU of one trained model on every test slide, per patient.

For each test slide (splits["test"], files from the manifest): the tissue mask of the tiler
(same thumbnail µm/px, threshold and speck size), sliding-window inference over the tissue at the
model's working µm/px (`wsi.SlidePrediction`), and the ground truth rasterised strip by strip at
the same resolution with the tiler's conventions: annotated pixels get their class,
unannotated tissue `labels.unannotated`, glass `labels.outside_tissue` (ignore -> excluded). So
the test ground truth is exactly what the label tiles would hold there. Counts are pooled per
patient (sum over its slides, then Dice) and over all test patients; see `metrics` for the rules.

Outputs: `metrics.json` (below) and `overlays/<slide>.png` (thumbnail, predicted foreground tinted
amber, ground-truth foreground outlined green, ignored area greyed).

metrics.json keys: `budget, arm, seed, model_dir, model` (preset, encoder, target, tile size/µm/px),
`evaluation` (mpp, tile, overlap, stride, blending, std_ddof), `slides` {slide: {patient_id, dice,
iou, tp, fp, fn, tn, n_pixels, n_windows, seconds, windows_per_s, megapixels_per_s, size}},
`patients` {patient: {dice, iou, tp, fp, fn, tn, n_pixels, slides}}, `aggregate` {dice|iou:
{mean, std, min, max, median, worst_k_mean, worst_k, n, n_nan}} over patients, `pooled` {dice,
iou, tp, fp, fn, tn, n_pixels} over all test pixels, `skipped_slides`, `seconds`. Undefined scores
(both masks empty) are `null`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from stedm.config import Config, LabelsConfig, load_config
from stedm.data.annotations import Annotations, load_annotations
from stedm.data.manifest import SlideRecord, read_manifest
from stedm.data.slide import Slide, open_slide
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json, write_json
from stedm.segmentation.metrics import (
    Counts,
    foreground_counts,
    json_float,
    pool_by_patient,
    summarize,
)
from stedm.segmentation.model import SegModelConfig, load_model
from stedm.segmentation.wsi import (
    Predictor,
    SlidePrediction,
    model_predictor,
    overlay_grid,
    overlay_mpp,
)
from stedm.tiling.tiler import MIN_OBJECT_UM2
from stedm.tiling.tissue import tissue_mask
from stedm.tracking import start_run

log = logging.getLogger(__name__)
BLENDING = "gaussian (sigma = tile/8, floor 1e-3), argmax of the weighted softmax sums"


def slide_tissue(slide: Slide, config: Config) -> np.ndarray:
    """The tiler's tissue mask of a slide (thumbnail at tiling.thumbnail_mpp)."""
    tiling = config.tiling
    thumb = slide.thumbnail_mpp(tiling.thumbnail_mpp)
    min_px = max(1, round(MIN_OBJECT_UM2 / tiling.thumbnail_mpp**2))
    return tissue_mask(thumb, tiling.tissue_threshold, min_object_px=min_px, max_hole_px=min_px)


class GroundTruth:
    """Label rows of a slide at the working resolution, with the tiler's labelling conventions.

    Rows are rasterised in blocks of at most `block_px` columns: the rasteriser's scratch memory
    and work grow with the region's area times the polygons it meets, so a 50,000 px wide strip
    in one piece would cost ~0.5 GB per polygon.
    """

    def __init__(self, annotations: Annotations, labels: LabelsConfig, tissue: np.ndarray, *,
                 width: int, scale0: float, mask_scale: float, block_px: int = 4096):
        """scale0: level-0 px per working px; mask_scale: tissue-mask px per working px."""
        unannotated = labels.ignore_index if labels.unannotated == "ignore" else 0
        outside = 0 if labels.outside_tissue == "background" else labels.ignore_index
        self.values = np.array([outside, unannotated], dtype=np.uint8)  # indexed by tissue bool
        self.annotations, self.width, self.scale0, self.mask_scale = annotations, width, scale0, mask_scale
        self.mask = Image.fromarray(tissue.astype(np.uint8))
        self.block_px = int(block_px)

    def rows(self, y0: int, height: int) -> np.ndarray:
        """(height, width) uint8 labels of working rows y0 … y0 + height − 1."""
        s = self.mask_scale
        box = (0.0, y0 * s, self.width * s, (y0 + height) * s)
        tissue = np.asarray(self.mask.resize((self.width, height), Image.Resampling.NEAREST, box=box))
        fill = self.values[tissue]
        out = np.empty((height, self.width), dtype=np.uint8)
        for x0 in range(0, self.width, self.block_px):
            x1 = min(x0 + self.block_px, self.width)
            out[:, x0:x1] = self.annotations.rasterize(x0 * self.scale0, y0 * self.scale0, x1 - x0, height,
                                                       self.scale0, fill[:, x0:x1])
        return out


def draw_overlay(thumb: np.ndarray, pred: np.ndarray, gt: np.ndarray, title: str) -> Image.Image:
    """Thumbnail with predicted foreground tinted amber, ground-truth foreground outlined green and
    ignored pixels greyed (gt: 0 background, 1 foreground, 2 ignore)."""
    rgb = thumb.astype(np.float32)
    grey = rgb.mean(axis=-1, keepdims=True)
    ignore = gt == 2
    rgb[ignore] = 0.5 * rgb[ignore] + 0.5 * (0.6 * grey[ignore] + 0.4 * 255)
    rgb[pred] = 0.5 * rgb[pred] + 0.5 * np.array([255, 190, 0], dtype=np.float32)  # apart from H&E hues
    fg = gt == 1
    edge = ndimage.binary_dilation(fg ^ ndimage.binary_erosion(fg), iterations=1)
    rgb[edge] = (0, 150, 0)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).text((4, 4), title, fill=(0, 0, 0))
    return image


def evaluate_slide(record: SlideRecord, predictor: Predictor, config: Config, model_cfg: SegModelConfig, *,
                   device: str | torch.device = "cpu", overlay_max_px: int = 1024, progress: bool = True
                   ) -> tuple[Counts, Image.Image, dict[str, Any]]:
    """Predict one annotated slide and count foreground agreement with its annotations.

    Returns:
        The slide's counts, its overlay image and run facts (windows, seconds, size).
    """
    labels = config.labels
    annotations = load_annotations(record.annotation_path, labels)
    mpp, tile = model_cfg.tile_mpp, model_cfg.tile_size
    with open_slide(record.slide_path, record.mpp) as slide:
        tissue = slide_tissue(slide, config)
        prediction = SlidePrediction(
            slide, predictor, mpp=mpp, tile=tile, overlap=config.segmentation.eval_overlap, tissue=tissue,
            tissue_mpp=config.tiling.thumbnail_mpp, foreground=model_cfg.foreground, n_classes=model_cfg.classes,
            batch_size=config.segmentation.eval_batch_size, device=device, progress=progress,
            desc=f"infer {record.slide_id}",
        )
        width, height = prediction.width, prediction.height
        truth = GroundTruth(annotations, labels, tissue, width=width, scale0=prediction.scale0,
                            mask_scale=mpp / config.tiling.thumbnail_mpp)
        thumb = slide.thumbnail_mpp(overlay_mpp(slide, mpp, overlay_max_px))
        cols, rows = overlay_grid(width, height, thumb.shape[1], thumb.shape[0])
        pred_ov = np.zeros(thumb.shape[:2], dtype=bool)
        gt_ov = np.zeros(thumb.shape[:2], dtype=np.uint8)
        counts = Counts()
        fg_labels = np.asarray(labels.foreground_indices, dtype=np.uint8)
        for y0, fg in prediction:
            gt = truth.rows(y0, fg.shape[0])
            counts = counts + foreground_counts(fg, gt, labels.foreground_indices, labels.ignore_index)
            sel = np.flatnonzero((rows >= y0) & (rows < y0 + fg.shape[0]))
            if sel.size:
                r = rows[sel] - y0
                pred_ov[sel] = fg[r][:, cols]
                g = gt[r][:, cols]
                gt_ov[sel] = np.where(g == labels.ignore_index, 2, np.isin(g, fg_labels))
    title = f"{record.slide_id}  Dice {counts.dice:.3f}" if not math.isnan(counts.dice) else record.slide_id
    megapixels = prediction.n_windows * tile * tile / 1e6
    info = {
        "n_windows": prediction.n_windows, "n_windows_total": prediction.n_windows_total,
        "seconds": prediction.seconds, "read_seconds": prediction.read_seconds,
        "windows_per_s": prediction.n_windows / max(prediction.seconds, 1e-9),
        "megapixels_per_s": megapixels / max(prediction.seconds, 1e-9), "size": [width, height],
    }
    return counts, draw_overlay(thumb, pred_ov, gt_ov, title), info


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return json_float(value) if isinstance(value, float) else value


def evaluate_model(
    config: Config, *, model_dir: Path, test_slides: list[str], records: dict[str, SlideRecord],
    out: Path, overlays_dir: Path, identity: dict[str, Any], predictor: Predictor | None = None,
    model_cfg: SegModelConfig | None = None,
) -> dict[str, Any]:
    """Evaluate one model on the test slides; write metrics.json and the overlays. Returns the metrics.

    Args:
        identity: budget, arm, seed (copied into metrics.json).
        predictor, model_cfg: replace the model loaded from `model_dir` (tests: an oracle).
    """
    start = time.perf_counter()
    seg = config.segmentation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if predictor is None:
        model, model_cfg = load_model(model_dir, device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(seg.mixed_precision)
        predictor = model_predictor(model, dtype if device.type == "cuda" else None)
    assert model_cfg is not None
    if abs(model_cfg.tile_mpp - config.tiling.mpp) > 1e-6 * config.tiling.mpp:
        log.warning("the model was trained at %g µm/px, tiling.mpp is %g: predicting at the model's %g µm/px",
                    model_cfg.tile_mpp, config.tiling.mpp, model_cfg.tile_mpp)
    missing = [s for s in test_slides if s not in records]
    if missing:
        raise StedmError(f"test slides {missing[:3]} are not in the manifest; rerun the split stage")
    slide_counts: dict[str, Counts] = {}
    slides: dict[str, dict[str, Any]] = {}
    skipped = []
    with atomic_output(overlays_dir) as tmp_overlays:
        tmp_overlays.mkdir(parents=True)
        for slide_id in test_slides:
            record = records[slide_id]
            if record.annotation_path is None:
                log.warning("test slide %s has no annotations: skipped", slide_id)
                skipped.append(slide_id)
                continue
            counts, overlay, info = evaluate_slide(record, predictor, config, model_cfg, device=device)
            overlay.save(tmp_overlays / f"{slide_id}.png", format="PNG")
            slide_counts[slide_id] = counts
            slides[slide_id] = {"patient_id": record.patient_id, **counts.as_dict(), **info}
            log.info("%s (patient %s): Dice %.4f, IoU %.4f over %d px; %d windows in %.1f s (%.1f windows/s)",
                     slide_id, record.patient_id, counts.dice, counts.iou, counts.n_pixels, info["n_windows"],
                     info["seconds"], info["windows_per_s"])
        patient_of = {s: records[s].patient_id for s in slide_counts}
        patients = pool_by_patient(slide_counts, patient_of)
        pooled = sum(slide_counts.values(), Counts())
        metrics = {
            **identity, "model_dir": str(model_dir),
            "model": {k: model_cfg.to_dict()[k] for k in ("preset", "encoder_name", "target", "classes",
                                                            "tile_size", "tile_mpp")},
            "evaluation": {"mpp": model_cfg.tile_mpp, "tile": model_cfg.tile_size, "overlap": seg.eval_overlap,
                           "stride": max(1, round(model_cfg.tile_size * (1 - seg.eval_overlap))),
                           "blending": BLENDING, "std_ddof": 0, "worst_k": seg.worst_k},
            "slides": slides,
            "patients": {p: {**c.as_dict(), "slides": sorted(s for s, q in patient_of.items() if q == p)}
                         for p, c in patients.items()},
            "aggregate": {"dice": summarize([c.dice for c in patients.values()], seg.worst_k),
                          "iou": summarize([c.iou for c in patients.values()], seg.worst_k)},
            "pooled": pooled.as_dict(),
            "skipped_slides": skipped,
            "seconds": time.perf_counter() - start,
        }
        metrics = _clean(metrics)
        write_json(out, metrics)
    agg = metrics["aggregate"]["dice"]
    log.info("%d test patients: Dice %s ± %s (min %s, worst-%d mean %s), pooled %s; wrote %s and %s",
             len(patients), agg["mean"], agg["std"], agg["min"], agg["worst_k"], agg["worst_k_mean"],
             metrics["pooled"]["dice"], out, overlays_dir)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", required=True, type=int, help="annotation budget of the model")
    parser.add_argument("--arm", required=True, help="training arm of the model")
    parser.add_argument("--seed", required=True, type=int, help="seed of the model")
    parser.add_argument("--model", required=True, type=Path, help="trained model directory (train-seg --out)")
    parser.add_argument("--splits", required=True, type=Path, help="splits.json (its 'test' slides are evaluated)")
    parser.add_argument("--manifest", required=True, type=Path, help="cohort manifest CSV (slide files)")
    parser.add_argument("--out", required=True, type=Path, help="metrics.json to write")
    parser.add_argument("--overlays", required=True, type=Path, help="folder for <slide>.png overlays")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    splits = read_json(args.splits)
    records = {r.slide_id: r for r in read_manifest(args.manifest)}
    name = f"budget~{args.budget}/arm~{args.arm}/seed~{args.seed}"
    identity = {"budget": args.budget, "arm": args.arm, "seed": args.seed}
    with start_run(config, f"evaluate_segmentation {name}", params={**identity, "model": str(args.model)},
                   parent=f"budget~{args.budget}/seed~{args.seed}") as run_:
        metrics = evaluate_model(config, model_dir=args.model, test_slides=list(splits["test"]), records=records,
                                 out=args.out, overlays_dir=args.overlays, identity=identity)
        agg = metrics["aggregate"]["dice"]
        run_.log_metrics({"test_dice_mean": agg["mean"], "test_dice_std": agg["std"], "test_dice_min": agg["min"],
                          "test_dice_worst_k_mean": agg["worst_k_mean"], "test_dice_pooled": metrics["pooled"]["dice"]})
        run_.log_artifact(args.out)
