"""`stedm train-stedm`: train one STEDM model on the annotated tiles of one budget.

The denoiser, the style encoder and the aggregation block are optimised jointly (unless
`stedm.freeze_style`), on the budget's slides only: content tiles with their layouts, style sets
drawn from the same slide (nearby / multi-patch / augmented), the style dropped to the null style
with probability `style_dropout` so classifier-free guidance over style works at sampling time.
The saved model holds the EMA weights (what generation uses) with the full run config beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from stedm.config import Config, load_config
from stedm.data.splits import budget_slides
from stedm.diffusion.data import StedmTrainDataset, layout_channels
from stedm.diffusion.loop import (
    LoopSettings,
    apply_ema,
    fingerprint,
    make_accelerator,
    plot_history,
    train_loop,
)
from stedm.diffusion.train_autoencoder import INFO_FILE
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json, sha256_file
from stedm.models.autoencoder import encode, load_autoencoder
from stedm.models.denoiser import make_noise_scheduler
from stedm.models.stedm import StedmModel, StedmModelConfig
from stedm.models.stedm import diffusion_loss as model_diffusion_loss
from stedm.tiling.store import store_fingerprint, tile_store_paths
from stedm.tracking import start_run

log = logging.getLogger(__name__)
RUN_FILE = "stedm_run.json"


def build_model(config: Config, latent_channels: int, latent_size: int) -> StedmModel:
    model_cfg = StedmModelConfig.from_workflow(
        config.stedm,
        latent_channels=latent_channels,
        latent_size=latent_size,
        style_size=latent_size * 4,
        n_layout_channels=layout_channels(config.stedm.layout, len(config.labels.classes)),
    )
    return StedmModel(config=model_cfg, style_encoder_weights=config.stedm.style_encoder_weights)


def diffusion_loss(model, ae, scheduler, batch, gen, loss_type: str):
    """The model-level diffusion loss on the autoencoder latents of a training batch."""
    with torch.no_grad():
        latents = encode(ae, batch["image"])
    loss = model_diffusion_loss(
        model, scheduler, latents, batch["layout"], batch["style"],
        drop_mask=batch["style_dropped"], loss=loss_type, generator=gen,
    )
    return loss, {"loss": loss.item()}


def train_stedm(
    config: Config, budget: int, stores: list[Path], autoencoder_dir: Path, out: Path, work_dir: Path,
    stop_after: int | None = None,
) -> dict:
    """Train and save the model for one budget. Returns the run summary (also saved as JSON)."""
    cfg = config.stedm
    torch.manual_seed(config.seed)
    ae = load_autoencoder(autoencoder_dir)
    ae.requires_grad_(False)
    steps = cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum
    dataset = StedmTrainDataset.from_config(stores, config, num_samples=steps * per_step)
    if dataset.tile_size != config.tiling.tile_size:
        raise StedmError(
            f"the tile stores hold {dataset.tile_size} px tiles but tiling.tile_size is "
            f"{config.tiling.tile_size}; pass the config the tiles were made with (or retile)"
        )
    latent_size = dataset.tile_size // 4
    model = build_model(config, ae.config.latent_channels, latent_size)
    counts = model.parameter_counts()
    log.info("budget %d: %d slides, model %s", budget, len(stores), counts)
    scheduler = make_noise_scheduler("ddpm", model.config.prediction_type)
    settings = LoopSettings(
        steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
        mixed_precision=cfg.mixed_precision, ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every, seed=config.seed, stop_after=stop_after,
        fingerprint=fingerprint(
            {k: config.section(k) for k in ("labels", "tiling", "stedm")}, config.seed, budget,
            [store_fingerprint(s) for s in stores], sha256_file(next(autoencoder_dir.glob("*.safetensors"))),
        ),
    )
    accelerator = make_accelerator(settings)
    ae.to(accelerator.device)

    def loss_fn(m, batch, gen):
        return diffusion_loss(m, ae, scheduler, batch, gen, cfg.loss)

    params = {"stedm": config.section("stedm"), "labels": config.section("labels"), "budget": budget}
    with start_run(config, f"train_stedm budget~{budget}", params=params, parent=f"budget~{budget}") as run:
        model, ema, result = train_loop(
            model=model, dataset=dataset, loss_fn=loss_fn, settings=settings, work_dir=work_dir,
            accelerator=accelerator, on_log=run.log_metrics, desc=f"stedm budget~{budget}",
        )
        if result.step < steps or not accelerator.is_main_process:  # interrupted (tests) / other ranks
            return {"step": result.step, "history": result.history}
        apply_ema(model, ema)
        model = model.cpu().eval()
        ae_info = read_json(autoencoder_dir / INFO_FILE) if (autoencoder_dir / INFO_FILE).exists() else {}
        summary = {
            "budget": budget,
            "slides": [p.stem for p in stores],
            "n_tiles": int(sum(s.n for s in dataset.index.slides.values())),
            "steps": steps,
            "samples_seen": steps * per_step,
            "train_seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "parameters": counts,
            "weights": "ema" if ema is not None else "raw",
            "autoencoder": {
                "path": str(autoencoder_dir.resolve()),
                "sha256": sha256_file(next(autoencoder_dir.glob("*.safetensors"))),
                "scaling_factor": ae_info.get("scaling_factor"),
            },
            "config": {k: config.section(k) for k in ("labels", "tiling", "stedm")} | {"seed": config.seed},
            "history": result.history,
        }
        with atomic_output(out) as tmp:
            model.save_pretrained(tmp)
            (tmp / RUN_FILE).write_text(json.dumps(summary, indent=2, default=str))
            plot_history(result.history, tmp / "loss_curve.png", f"STEDM budget {budget}")
        run.log_metrics({"train_seconds": result.seconds, "final_loss": result.history[-1]["loss"]})
        run.log_artifact(out / "loss_curve.png")
    log.info("saved %s (%d steps in %.0f s)", out, steps, result.seconds)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", required=True, type=int, help="annotation budget (slides), a key of splits.json budgets")
    parser.add_argument("--splits", required=True, type=Path, help="splits.json")
    parser.add_argument("--tiles-dir", required=True, type=Path, help="folder of <slide>.zarr stores")
    parser.add_argument("--autoencoder", required=True, type=Path, help="trained autoencoder directory")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: <out>.work)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    splits = read_json(args.splits)
    stores = tile_store_paths(args.tiles_dir, budget_slides(splits, args.budget))
    work = args.work_dir or args.out.with_name(args.out.name + ".work")
    train_stedm(config, args.budget, stores, args.autoencoder, args.out, work)
