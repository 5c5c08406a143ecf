"""The training loop shared by the autoencoder and STEDM trainers.

What it owns, so each trainer only writes its loss: HF `accelerate` (CPU, one or several GPUs,
fp16/bf16), gradient accumulation, AdamW, an optional EMA of the trainable weights (diffusers
`EMAModel`), resumable checkpoints every N steps, a tqdm bar, MLflow metrics and a loss curve.

Exact resumption: data items are pure functions of a global sample counter (`CounterSampler`
starts where the last checkpoint stopped), each step's noise comes from a generator seeded with
(seed, step), and the optimiser, EMA and RNG states are restored. On CPU an interrupted run
therefore continues bit-for-bit like an uninterrupted one (tested).

Optional model selection: a `validate(model, step) -> score` callback runs every
`validate_every` steps (higher is better); the loop keeps the best-scoring weights, and the
validation history and best weights travel in the checkpoints, so selection survives resumption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stedm.diffusion.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = None
    checkpoint_every: int = 500
    seed: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    num_workers: int = 0
    log_every: int = 10
    stop_after: int | None = None  # for tests: simulate an interruption after this many steps
    validate_every: int | None = None  # steps between `validate` calls (and at the last step)
    # What the run depends on (config, data, inputs; see `fingerprint`): a checkpoint written
    # under another fingerprint is discarded instead of being resumed.
    fingerprint: str = ""


@dataclass
class LoopResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None
    val_history: list[dict[str, float]] = field(default_factory=list)  # {"step", "score"}
    best_step: int | None = None  # step of the best validation score (None: never validated)
    best_state: dict[str, torch.Tensor] | None = None  # its weights (CPU copies)


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable parts: config sections, input fingerprints, slide lists."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def make_accelerator(settings: LoopSettings) -> Accelerator:
    """CPU when no GPU is present; mixed precision only where the device supports it."""
    cpu = not torch.cuda.is_available()
    precision = settings.mixed_precision
    if cpu and precision == "fp16":
        log.warning("fp16 needs a GPU; training in fp32 on CPU")
        precision = "no"
    return Accelerator(
        cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=settings.grad_accum
    )


def step_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The generator for one optimiser step's noise: independent of how the run was split."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) * 1_000_003 + int(step) + int(rank) * 104_729_000_003)
    return gen


class StepSampler(Sampler[int]):
    """Global sample counters for optimiser steps [start, stop), sharded over processes.

    Micro-batch a of step s on process r holds the counters ((s*A + a)*W + r)*B ... +B-1, so
    several GPUs see disjoint data and one process (W=1) reads 0, 1, 2, ... in order; resuming at
    step `start` continues exactly where the checkpoint left off.
    """

    def __init__(self, start: int, stop: int, batch: int, accum: int, world: int = 1, rank: int = 0):
        self.start, self.stop, self.batch, self.accum = start, stop, batch, accum
        self.world, self.rank = world, rank

    def __iter__(self) -> Iterator[int]:
        for micro in range(self.start * self.accum, self.stop * self.accum):
            first = (micro * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum * self.batch


def train_loop(
    *,
    model: torch.nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any], torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    settings: LoopSettings,
    work_dir: Path,
    accelerator: Accelerator | None = None,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    desc: str = "train",
    validate: Callable[[torch.nn.Module, int], float] | None = None,
) -> tuple[torch.nn.Module, EMAModel | None, LoopResult]:
    """Train `model` (its trainable parameters) on `dataset` with `loss_fn`, resuming if possible.

    Args:
        loss_fn: (model, batch, generator) -> (loss, scalars to log). Called once per micro-batch.
        work_dir: where `checkpoints/step-*` live; an existing one is resumed from.
        validate: (unwrapped model in eval mode, step) -> score, higher is better; called every
            `settings.validate_every` steps and at the last step, under `torch.no_grad()`. A NaN
            score never counts as best; ties keep the earlier step.
    Returns:
        The unwrapped model (final weights), the EMA (or None) and a LoopResult.
    """
    accelerator = accelerator or make_accelerator(settings)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay else None
    history: list[dict[str, float]] = []
    val_history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    start, resumed_from = 0, None
    ckpt = latest_checkpoint(work_dir)
    if ckpt is not None and json.loads((ckpt / STATE_FILE).read_text()).get("fingerprint", "") != settings.fingerprint:
        # A rerun after a config or input change: resuming would silently reproduce the old model.
        log.warning("checkpoints in %s belong to another configuration or input; starting afresh", work_dir)
        shutil.rmtree(Path(work_dir) / "checkpoints", ignore_errors=True)
        ckpt = None
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt, optimizer)
        model.load_state_dict(tensors["model"], strict=True)
        if ema is not None and "ema" in tensors:
            for shadow, name in zip(ema.shadow_params, names, strict=True):
                shadow.data.copy_(tensors["ema"][name])
            ema.optimization_step = state.get("ema_optimization_step", state["step"])
        start, history, resumed_from = state["step"], state.get("history", []), state["step"]
        val_history = state.get("val_history", [])
        best_state = tensors.get("best")
        log.info("resuming from %s (step %d)", ckpt, start)
    micro = settings.batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=StepSampler(start, settings.steps, micro, settings.grad_accum, world, rank),
        num_workers=settings.num_workers,
        drop_last=True,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    model.train()
    t0 = time.perf_counter()
    step = start
    # In a job log (no terminal) a line every 30 s shows progress without flooding the log.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=settings.steps, initial=start, desc=desc, mininterval=2.0 if interactive else 30.0,
               disable=not accelerator.is_main_process)
    batches = iter(loader)
    while step < settings.steps:
        gen = step_generator(settings.seed, step, accelerator.device, rank)
        logs: dict[str, float] = {}
        for _ in range(settings.grad_accum):
            batch = next(batches)
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(model), accelerator.autocast():
                loss, parts = loss_fn(model, batch, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / settings.grad_accum
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {logs}; lower the learning rate")
        if ema is not None:
            ema.step(params)
        step += 1
        history.append({"step": step, **logs})  # every step: resumption keeps it exact
        bar.update(1)
        if validate is not None and (step % (settings.validate_every or settings.steps) == 0
                                     or step == settings.steps):
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.eval()
            with torch.no_grad():
                score = float(validate(unwrapped, step))
            model.train()
            best = max((v["score"] for v in val_history if not math.isnan(v["score"])), default=-math.inf)
            if not math.isnan(score) and score > best:
                best_state = {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
            val_history.append({"step": step, "score": score})
        if step % settings.log_every == 0 or step == settings.steps:
            recent = history[-settings.log_every :]
            mean = {k: sum(r[k] for r in recent) / len(recent) for k in logs}
            bar.set_postfix({k: f"{v:.4f}" for k, v in mean.items()})
            if on_log is not None:
                on_log(mean, step)
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            unwrapped = accelerator.unwrap_model(model)
            tensors = {"model": unwrapped.state_dict()}
            state: dict[str, Any] = {
                "history": history, "val_history": val_history, "fingerprint": settings.fingerprint,
            }
            if best_state is not None:
                tensors["best"] = best_state
            if ema is not None:
                tensors["ema"] = dict(zip(names, ema.shadow_params, strict=True))
                state["ema_optimization_step"] = ema.optimization_step
            if accelerator.is_main_process:
                save_checkpoint(work_dir, step, tensors, optimizer, state)
            accelerator.wait_for_everyone()
        if settings.stop_after is not None and step - start >= settings.stop_after:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    scored = [v for v in val_history if not math.isnan(v["score"])]
    best_step = int(max(scored, key=lambda v: v["score"])["step"]) if scored else None  # first max
    result = LoopResult(step, history, seconds, resumed_from, val_history, best_step, best_state)
    return accelerator.unwrap_model(model), ema, result


def apply_ema(model: torch.nn.Module, ema: EMAModel | None) -> None:
    """Copy the EMA weights into the model's trainable parameters (what sampling should use)."""
    if ema is None:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    ema.copy_to(params)


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    """A loss-curve PNG (every logged scalar against the step), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stedm.io import atomic_output

    if not history:
        return
    keys = [k for k in history[0] if k != "step"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.array([h["step"] for h in history])
    window = max(1, len(history) // 50)  # per-step losses are noisy: show a moving average too
    for k in keys:
        values = np.array([h[k] for h in history], dtype=float)
        line = ax.plot(steps, values, alpha=0.25, lw=0.8)[0]
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=line.get_color(), label=f"{k} (mean of {window})")
    ax.set_xlabel("optimiser step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
