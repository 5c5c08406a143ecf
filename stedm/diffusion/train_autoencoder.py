"""`stedm train-autoencoder`: the frozen first stage of the latent diffusion model.

Either trains a diffusers autoencoder (preset `tiny` or `paper`) on tiles of the annotated
training pool — images only, never the style pool, whose styles must stay unseen — or loads a
local diffusers-format directory (`autoencoder.source: pretrained`, e.g. a converted VQ-f4). In
both cases the latent scaling factor is computed from the cohort's tiles and stored in the saved
model's config, and the reconstruction quality on validation tiles is recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from stedm.config import Config, load_config
from stedm.diffusion.data import AutoencoderTileDataset
from stedm.diffusion.loop import (
    LoopSettings,
    fingerprint,
    make_accelerator,
    plot_history,
    train_loop,
)
from stedm.io import atomic_output, read_json, sha256_file
from stedm.models.autoencoder import (
    autoencoder_loss,
    build_autoencoder,
    compute_scaling_factor,
    decode,
    encode,
    load_autoencoder,
    set_scaling_factor,
)
from stedm.tiling.store import store_fingerprint, tile_store_paths
from stedm.tracking import start_run

log = logging.getLogger(__name__)
INFO_FILE = "stedm_autoencoder.json"


def _batch(dataset: AutoencoderTileDataset, n: int, offset: int = 0) -> torch.Tensor:
    return torch.stack([dataset[offset + i]["image"] for i in range(min(n, len(dataset)))])


@torch.no_grad()
def reconstruction_quality(ae, images: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Mean L1 and PSNR (dB, images in [0, 1]) of encode→decode on `images` in [-1, 1]."""
    l1, mse = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        y = decode(ae, encode(ae, x))
        l1.append((y - x).abs().mean().item())
        mse.append((((y - x) / 2) ** 2).mean().item())
    m = float(np.mean(mse))
    return {"rec_l1": float(np.mean(l1)), "psnr_db": 10 * math.log10(1.0 / max(m, 1e-12))}


def train_autoencoder(
    config: Config, train_stores: list[Path], val_stores: list[Path], out: Path, work_dir: Path,
    stop_after: int | None = None,
) -> dict:
    """Train (or load) the autoencoder, set its scaling factor, save it to `out` atomically."""
    cfg = config.autoencoder
    torch.manual_seed(config.seed)
    steps = cfg.steps
    if cfg.source == "pretrained":
        ae = load_autoencoder(cfg.pretrained_path)
        history, seconds, source = [], 0.0, {"path": str(cfg.pretrained_path)}
        weights = sorted(Path(cfg.pretrained_path).glob("*.safetensors"))
        source["sha256"] = {w.name: sha256_file(w) for w in weights}
    else:
        ae = build_autoencoder(cfg.kind, cfg.preset)
        dataset = AutoencoderTileDataset(train_stores, num_samples=steps * cfg.batch_size, seed=config.seed)
        settings = LoopSettings(
            steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, mixed_precision=cfg.mixed_precision,
            checkpoint_every=max(1, steps // 4), seed=config.seed, stop_after=stop_after,
            fingerprint=fingerprint(config.section("autoencoder"), config.seed,
                                    [store_fingerprint(s) for s in train_stores]),
        )

        def loss_fn(model, batch, gen):
            images = batch["image"]
            crop = cfg.train_crop
            if crop and crop < images.shape[-1]:  # one random crop per batch, from the step's generator
                y, x = torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen, device=gen.device).tolist()
                images = images[..., y : y + crop, x : x + crop]
            return autoencoder_loss(model, images, kl_weight=cfg.kl_weight)

        accelerator = make_accelerator(settings)
        with start_run(config, "train_autoencoder", params={"autoencoder": config.section("autoencoder")}) as run:
            ae, _, result = train_loop(
                model=ae, dataset=dataset, loss_fn=loss_fn, settings=settings, work_dir=work_dir,
                accelerator=accelerator, on_log=run.log_metrics, desc="autoencoder",
            )
        if result.step < steps or not accelerator.is_main_process:  # interrupted (tests) / other ranks
            return {"step": result.step}
        history, seconds, source = result.history, result.seconds, {"trained_steps": steps}
    ae = ae.cpu().eval()
    ae.requires_grad_(False)
    sample_set = AutoencoderTileDataset(train_stores, num_samples=256, seed=config.seed + 1)
    with torch.no_grad():
        latents = torch.cat([encode(ae, b, scaled=False) for b in _batch(sample_set, 256).split(32)])
    factor = compute_scaling_factor(latents)
    set_scaling_factor(ae, factor)
    quality = {}
    if val_stores:
        val_set = AutoencoderTileDataset(val_stores, num_samples=128, seed=config.seed + 2)
        quality = reconstruction_quality(ae, _batch(val_set, 128))
    info = {
        "source": cfg.source, "kind": cfg.kind, "preset": cfg.preset, "scaling_factor": factor,
        "latent_shape": list(latents.shape[1:]), "validation": quality, "train_seconds": seconds,
        "history": history, "provenance": source,
    }
    with atomic_output(out) as tmp:
        ae.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        plot_history(history, tmp / "loss_curve.png", "autoencoder")
    log.info("autoencoder saved to %s (scaling factor %.4f, validation %s)", out, factor, quality)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--splits", required=True, type=Path, help="splits.json")
    parser.add_argument("--tiles-dir", required=True, type=Path, help="folder of <slide>.zarr stores")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: <out>.work)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    splits = read_json(args.splits)
    train = tile_store_paths(args.tiles_dir, splits["train_pool"])
    val = tile_store_paths(args.tiles_dir, splits["val"])
    work = args.work_dir or args.out.with_name(args.out.name + ".work")
    train_autoencoder(config, train, val, args.out, work)
