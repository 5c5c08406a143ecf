"""`stedm train-seg`: train one segmentation model for a (budget, arm, seed) and keep its best weights.

The arm (from `segmentation.arms`) decides the data: the budget's annotated tiles, mixed per
batch with the budget's synthetic tiles (`synthetic_fraction`), optionally HED-jittered
(`stain_augmentation`). Loss = ce_weight · cross-entropy + dice_weight · soft Dice (the paper:
0.1 / 0.9), ignore pixels excluded from both; for the binary target the Dice term is the
foreground channel's only, as in the official code. The shared training loop
(`stedm.diffusion.loop`) runs AdamW, checkpoints and exact resumption; every `val_every` steps it
calls the validation here — foreground Dice pooled over all annotated tiles of the validation
slides — and the best-scoring weights are the ones saved.

The seed decides the model initialisation and the data order; arms with the same seed start from
the same weights, so arms are compared on paired runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from stedm.config import Config, load_config
from stedm.data.splits import budget_slides
from stedm.diffusion.loop import LoopSettings, fingerprint, make_accelerator, train_loop
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json, sha256_file
from stedm.segmentation.data import SegTrainDataset, ValidationTiles, n_synthetic
from stedm.segmentation.metrics import Counts, foreground_counts_torch
from stedm.segmentation.model import SegModelConfig, build_model, load_encoder_weights, save_model
from stedm.tiling.store import store_fingerprint, tile_store_paths
from stedm.tracking import start_run

log = logging.getLogger(__name__)
TRAINING_FILE = "training.json"
CURVE_FILE = "training_curve.png"


def make_loss(cfg: SegModelConfig, ce_weight: float, dice_weight: float, ignore_index: int):
    """The training loss for the shared loop: (model, batch, generator) -> (loss, scalars)."""
    import segmentation_models_pytorch as smp

    dice = smp.losses.DiceLoss(
        "multiclass", classes=list(cfg.foreground) if cfg.target == "binary" else None,
        smooth=0.01, ignore_index=ignore_index,  # the official ε = 0.01
    )

    def loss_fn(model, batch, gen):
        logits = model(batch["image"]).float()
        target = batch["target"]
        n_valid = (target != ignore_index).sum().clamp(min=1)  # an all-ignore batch gives 0, not NaN
        ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / n_valid
        dl = dice(logits, target)
        loss = ce_weight * ce + dice_weight * dl
        return loss, {"loss": loss.item(), "ce": ce.item(), "dice_loss": dl.item()}

    return loss_fn


@torch.no_grad()
def validation_counts(model: torch.nn.Module, tiles: ValidationTiles, foreground: tuple[int, ...],
                      ignore_index: int, batch_size: int = 16) -> Counts:
    """Foreground confusion counts of `model` (eval mode) pooled over all validation tiles."""
    device = next(model.parameters()).device
    total = Counts()
    for x, y in tiles.batches(batch_size):
        pred = model(x.to(device)).argmax(1)
        total = total + foreground_counts_torch(pred, y.to(device), foreground, ignore_index)
    return total


def plot_training(history: list[dict[str, float]], val_history: list[dict[str, float]], path: Path,
                  title: str, best_step: int | None) -> None:
    """Training loss (per step and smoothed) and validation Dice against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history], dtype=float)
    window = max(1, len(loss) // 50)
    ax.plot(steps, loss, alpha=0.25, lw=0.8, color="C0")
    ax.plot(steps[window - 1 :], np.convolve(loss, np.ones(window) / window, "valid"), color="C0",
            label=f"train loss (mean of {window})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    if val_history:
        ax2 = ax.twinx()
        ax2.plot([v["step"] for v in val_history], [v["score"] for v in val_history], "o-", color="C1",
                 label="validation Dice")
        if best_step is not None:
            ax2.axvline(best_step, color="C1", ls=":", lw=1)
        ax2.set_ylabel("validation Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _tile_geometry(stores: list[Path], config: Config) -> tuple[int, float]:
    """Tile size and µm/px recorded by the tiler (the config's when a store predates the attrs)."""
    import zarr

    group = zarr.open_group(str(stores[0]), mode="r")
    size = int(group.attrs.get("tile_size", group["images"].shape[1]))
    mpp = float(group.attrs.get("mpp", config.tiling.mpp))
    return size, mpp


EVAL_KEYS = {"eval_overlap", "eval_batch_size", "worst_k"}  # evaluation only: never retrain for them


def train_segmentation(
    config: Config, *, budget: int, arm: str, seed: int, train_stores: list[Path], val_stores: list[Path],
    out: Path, work_dir: Path, synthetic_store: Path | None = None, stop_after: int | None = None,
    validate: Callable[[torch.nn.Module, int], float] | None = None,
) -> dict[str, Any]:
    """Train, select by validation Dice, and save one model. Returns the training summary.

    Args:
        validate: replaces the validation-Dice callback (tests: a scripted score sequence).
    """
    seg, labels = config.segmentation, config.labels
    if arm not in seg.arms:
        raise StedmError(f"arm {arm!r} is not in segmentation.arms {sorted(seg.arms)}")
    arm_cfg = seg.arms[arm]
    if not arm_cfg.runs_for(budget):
        raise StedmError(f"arm {arm!r} does not run for budget {budget} (its budgets: {list(arm_cfg.budgets)})")
    if arm_cfg.synthetic_fraction > 0 and synthetic_store is None:
        raise StedmError(f"arm {arm!r} mixes in synthetic tiles (synthetic_fraction "
                         f"{arm_cfg.synthetic_fraction}): pass the budget's synthetic store (--synthetic)")
    if arm_cfg.synthetic_fraction > 0 and seg.target == "classes":
        layout = zarr.open_group(str(synthetic_store), mode="r").attrs.get("layout", "binary")
        if layout != "classes":
            raise StedmError(
                f"arm {arm!r}: segmentation.target is 'classes' but {synthetic_store} was generated from "
                f"{layout} layouts, so its images carry only foreground vs rest; set stedm.layout: classes "
                "(and regenerate) or segmentation.target: binary"
            )
    per_batch = arm_cfg.synthetic_fraction * seg.batch_size
    if arm_cfg.synthetic_fraction > 0 and abs(per_batch - round(per_batch)) > 1e-9:
        log.warning("arm %s: %.2f x batch %d is not a whole number of synthetic tiles; using %d per batch",
                    arm, arm_cfg.synthetic_fraction, seg.batch_size, n_synthetic(arm_cfg.synthetic_fraction, seg.batch_size))
    if not train_stores:
        raise StedmError(f"budget {budget} has no slides")
    tile_size, tile_mpp = _tile_geometry(train_stores, config)
    model_cfg = SegModelConfig.from_workflow(seg, labels, tile_size=tile_size, tile_mpp=tile_mpp)
    torch.manual_seed(seed)  # the model initialisation follows the seed
    model = build_model(model_cfg)
    if seg.encoder_weights:
        load_encoder_weights(model, seg.encoder_weights)
    dataset = SegTrainDataset(
        train_stores, foreground=labels.foreground_indices, n_classes=len(labels.classes),
        batch_size=seg.batch_size, num_samples=seg.steps * seg.batch_size, target=seg.target,
        ignore_index=labels.ignore_index, synthetic_store=synthetic_store if arm_cfg.synthetic_fraction > 0 else None,
        synthetic_fraction=arm_cfg.synthetic_fraction, stain_augmentation=arm_cfg.stain_augmentation, seed=seed,
    )
    val_tiles = ValidationTiles(val_stores, target=seg.target, foreground=labels.foreground_indices,
                                n_classes=len(labels.classes), ignore_index=labels.ignore_index)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("budget %d, arm %s, seed %d: %d real tiles, %d synthetic per batch of %d (store: %d tiles), "
             "%d validation tiles, %s %s (%.2f M parameters)", budget, arm, seed, dataset.n_real_tiles,
             dataset.n_synthetic, seg.batch_size, dataset.n_synthetic_tiles, val_tiles.n_tiles,
             model_cfg.preset, model_cfg.encoder_name, n_params / 1e6)
    settings = LoopSettings(
        steps=seg.steps, batch_size=seg.batch_size, lr=seg.lr, mixed_precision=seg.mixed_precision,
        checkpoint_every=seg.val_every, validate_every=seg.val_every, seed=seed, stop_after=stop_after,
        max_grad_norm=None, log_every=min(10, seg.val_every),
        fingerprint=fingerprint(
            {k: v for k, v in config.section("segmentation").items() if k not in EVAL_KEYS | {"arms", "seeds"}},
            seg.arms[arm], seed, budget, config.section("labels"), config.section("tiling"),
            [store_fingerprint(s) for s in [*train_stores, *val_stores]],
            store_fingerprint(synthetic_store) if synthetic_store is not None and seg.arms[arm].synthetic_fraction > 0 else None,
        ),
    )
    accelerator = make_accelerator(settings)
    name = f"budget~{budget}/arm~{arm}/seed~{seed}"
    # only this job's arm: MLflow rejects '+' (real+stedm) in parameter names
    seg_params = {k: v for k, v in config.section("segmentation").items() if k != "arms"}
    params = {"segmentation": seg_params, "arm_config": config.section("segmentation")["arms"][arm],
              "labels": config.section("labels"), "budget": budget, "arm": arm, "seed": seed}
    with start_run(config, f"train_segmentation {name}", params=params, parent=f"budget~{budget}/seed~{seed}") as run:
        def val_dice(m: torch.nn.Module, step: int) -> float:
            counts = validation_counts(m, val_tiles, model_cfg.foreground, labels.ignore_index,
                                       seg.eval_batch_size)
            run.log_metrics({"val_dice": counts.dice, "val_iou": counts.iou}, step=step)
            log.info("step %d: validation Dice %.4f (%d tiles)", step, counts.dice, val_tiles.n_tiles)
            return counts.dice

        if validate is None and val_tiles.n_tiles:
            validate = val_dice
        elif validate is None:
            log.warning("no annotated validation tiles: the last weights are kept")
        model, _, result = train_loop(
            model=model, dataset=dataset, loss_fn=make_loss(model_cfg, seg.ce_weight, seg.dice_weight,
                                                            labels.ignore_index),
            settings=settings, work_dir=work_dir, accelerator=accelerator, on_log=run.log_metrics,
            desc=f"seg {name}", validate=validate,
        )
        if result.step < seg.steps or not accelerator.is_main_process:  # interrupted (tests) / other ranks
            return {"step": result.step, "history": result.history, "val_history": result.val_history}
        best = {v["step"]: v["score"] for v in result.val_history}.get(result.best_step)
        summary = {
            "budget": budget, "arm": arm, "seed": seed, "arm_config": config.section("segmentation")["arms"][arm],
            "slides": [p.stem for p in train_stores], "val_slides": [p.stem for p in val_stores],
            "synthetic_store": str(synthetic_store) if dataset.n_synthetic else None,
            "encoder_weights": {"path": seg.encoder_weights, "sha256": sha256_file(seg.encoder_weights)}
            if seg.encoder_weights else None,
            "n_real_tiles": dataset.n_real_tiles, "n_synthetic_tiles": dataset.n_synthetic_tiles,
            "synthetic_per_batch": dataset.n_synthetic, "n_val_tiles": val_tiles.n_tiles,
            "steps": seg.steps, "batch_size": seg.batch_size, "weights": "best" if result.best_state else "last",
            "best_step": result.best_step, "best_val_dice": best,
            "val_history": [{"step": v["step"], "dice": v["score"]} for v in result.val_history],
            "seconds": result.seconds, "seconds_per_step": result.seconds / max(1, seg.steps - (result.resumed_from or 0)),
            "resumed_from": result.resumed_from, "device": str(accelerator.device), "parameters": n_params,
            "model": model_cfg.to_dict(),
            "config": {k: config.section(k) for k in ("labels", "tiling", "segmentation")},
            "history": result.history,
        }
        with atomic_output(out) as tmp:
            save_model(model, model_cfg, tmp, state_dict=result.best_state)
            (tmp / TRAINING_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            plot_training(result.history, result.val_history, tmp / CURVE_FILE, f"segmentation {name}",
                          result.best_step)
        run.log_metrics({"best_val_dice": best, "best_step": result.best_step, "train_seconds": result.seconds})
        run.log_artifact(out / CURVE_FILE)
    log.info("saved %s (best step %s, validation Dice %s; %d steps in %.0f s)", out, result.best_step, best,
             seg.steps, result.seconds)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", required=True, type=int, help="annotation budget, a key of splits.json budgets")
    parser.add_argument("--arm", required=True, help="training arm, a key of segmentation.arms")
    parser.add_argument("--seed", required=True, type=int, help="repetition seed (model init and data order)")
    parser.add_argument("--splits", required=True, type=Path, help="splits.json")
    parser.add_argument("--tiles-dir", required=True, type=Path, help="folder of <slide>.zarr tile stores")
    parser.add_argument("--synthetic", type=Path, nargs="?", default=None, const=None,
                        help="the budget's synthetic.zarr (arms with synthetic_fraction > 0)")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: <out>.work)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    splits = read_json(args.splits)
    start = time.perf_counter()
    train_segmentation(
        config, budget=args.budget, arm=args.arm, seed=args.seed,
        train_stores=tile_store_paths(args.tiles_dir, budget_slides(splits, args.budget)),
        val_stores=tile_store_paths(args.tiles_dir, splits["val"]),
        out=args.out, work_dir=args.work_dir or args.out.with_name(args.out.name + ".work"),
        synthetic_store=args.synthetic,
    )
    log.info("train-seg finished in %.0f s", time.perf_counter() - start)
