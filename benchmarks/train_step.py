"""STEDM training speed: optimiser steps/s for the `tiny` and `paper` presets.

Runs the real training path (`stedm.diffusion.loop.train_loop` with accelerate choosing the
device and precision, the frozen autoencoder encoding each batch, style encoder + aggregation +
denoiser trained jointly) on random tiles of the preset's size, so the figure is what a run on
this machine would see. On a CPU the paper preset is only timed for a few steps at a small batch.

    python benchmarks/train_step.py [--steps 20] [--paper-steps 2] [--paper-batch 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stedm.config import load_config
from stedm.diffusion.loop import LoopSettings, make_accelerator, train_loop
from stedm.diffusion.train import build_model, diffusion_loss
from stedm.models.autoencoder import build_autoencoder
from stedm.models.denoiser import make_noise_scheduler
from stedm.models.presets import get_preset


class RandomTiles(Dataset):
    """Random content tiles, binary layouts and style sets of the preset's shape."""

    def __init__(self, tile: int, n_style: int, n: int):
        self.tile, self.n_style, self.n = tile, n_style, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        fg = (torch.rand(1, self.tile, self.tile, generator=g) > 0.5).float()
        return {
            "image": torch.rand(3, self.tile, self.tile, generator=g) * 2 - 1,
            "layout": torch.cat([1 - fg, fg]),
            "style": torch.rand(self.n_style, 3, self.tile, self.tile, generator=g) * 2 - 1,
            "style_dropped": torch.tensor(i % 4 == 0),
        }


def measure(preset: str, steps: int, batch: int, kind: str) -> dict:
    config = load_config({
        "tracking": {"enabled": False},
        "autoencoder": {"preset": preset, "kind": kind},
        "stedm": {"preset": preset, "n_style": get_preset(preset).style.n_style,
                  "style_encoder": get_preset(preset).style.backbone},
    })
    p = get_preset(preset)
    ae = build_autoencoder(kind, preset).requires_grad_(False)
    model = build_model(config, ae.config.latent_channels, p.tile_size // 4)
    scheduler = make_noise_scheduler("ddpm", model.config.prediction_type)
    warmup = 2
    settings = LoopSettings(steps=steps + warmup, batch_size=batch, lr=1e-4, checkpoint_every=10**9,
                            seed=0, log_every=10**9, ema_decay=0.999)
    accelerator = make_accelerator(settings)
    ae.to(accelerator.device)
    data = RandomTiles(p.tile_size, config.stedm.n_style, (steps + warmup) * batch)
    times: list[float] = []

    def loss_fn(m, b, gen):
        times.append(time.perf_counter())
        return diffusion_loss(m, ae, scheduler, b, gen, "l1")

    with tempfile.TemporaryDirectory() as work:
        train_loop(model=model, dataset=data, loss_fn=loss_fn, settings=settings, work_dir=Path(work),
                   accelerator=accelerator, desc=preset)
    times.append(time.perf_counter())  # the end of the last step
    per_step = (times[-1] - times[warmup]) / (len(times) - 1 - warmup)
    return {
        "preset": preset, "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "batch": batch, "tile": p.tile_size, "latent": f"{ae.config.latent_channels}x{p.tile_size // 4}x{p.tile_size // 4}",
        "n_style": config.stedm.n_style, "params_M": sum(x.numel() for x in model.parameters()) / 1e6,
        "s_per_step": per_step, "steps_per_s": 1 / per_step, "samples_per_s": batch / per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--paper-steps", type=int, default=2)
    parser.add_argument("--paper-batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure("tiny", args.steps, 8, "kl")]
    if args.paper_steps > 0:
        rows.append(measure("paper", args.paper_steps, args.paper_batch, "vq"))
    print(f"torch threads: {torch.get_num_threads()}")
    print("preset  device  prec  batch  tile  latent     n_style  params(M)  s/step   steps/s  samples/s")
    for r in rows:
        print(f"{r['preset']:<7} {r['device']:<7} {r['precision']:<5} {r['batch']:>5}  {r['tile']:>4}  "
              f"{r['latent']:<10} {r['n_style']:>7}  {r['params_M']:>9.1f}  {r['s_per_step']:>7.3f}  "
              f"{r['steps_per_s']:>7.2f}  {r['samples_per_s']:>9.2f}")


if __name__ == "__main__":
    main()
