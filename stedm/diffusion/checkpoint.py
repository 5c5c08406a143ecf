"""Resumable training state: weights in safetensors, optimiser and RNG state beside them.

A checkpoint is a folder `step-000500/` written atomically (temp folder, then rename), so a job
killed mid-save leaves the previous checkpoint intact; `latest_checkpoint` finds the newest
complete one. Tensor state goes to safetensors (no pickle for weights); the optimiser state and
RNG states, which are nested Python structures, go through `torch.save`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stedm.io import atomic_output

STATE_FILE = "state.json"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    work_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `<work_dir>/checkpoints/step-NNNNNN/` and keep only the newest `keep` checkpoints.

    Args:
        tensors: named state dicts, e.g. {"model": ..., "ema": ...}, each saved as NAME.safetensors.
        optimizer: its state_dict is saved with torch.save.
        state: JSON-serialisable trainer state (step, loss history, ...).
    """
    root = Path(work_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    with atomic_output(final) as tmp:
        tmp.mkdir(parents=True)
        for name, sd in tensors.items():
            save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(work_dir) / "checkpoints"
    done = [p for p in sorted(root.glob("step-*")) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load a checkpoint: returns (named state dicts, trainer state); restores optimiser and RNG."""
    path = Path(path)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(extra["optimizer"])
    _set_rng_state(extra["rng"])
    return tensors, json.loads((path / STATE_FILE).read_text())
