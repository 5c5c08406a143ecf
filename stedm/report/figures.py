"""The report's figures (PNG, matplotlib Agg): per-patient Dice, samples, training curves, overlays.

Every function writes one PNG atomically and draws a readable placeholder panel ("no results")
rather than failing when an input is missing, so the report always says what it could not show.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stedm.io import atomic_output

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _plt()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)


def _placeholder(ax: Any, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="0.3")


def plot_per_patient(per_patient: dict[tuple[int, str], dict[str, float | None]], budgets: Sequence[int],
                     arms: Sequence[str], path: Path) -> None:
    """Strip plot per budget: one point per test patient and arm, lines join a patient across arms."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 4.2), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets, strict=True):
        present = [a for a in arms if (budget, a) in per_patient]
        if not present:
            _placeholder(ax, f"budget {budget}: no segmentation results")
            continue
        patients = sorted({p for a in present for p in per_patient[(budget, a)]})
        for k, patient in enumerate(patients):
            ys = [per_patient[(budget, a)].get(patient) for a in present]
            xs = [x for x, y in enumerate(ys) if y is not None]
            ys = [y for y in ys if y is not None]
            colour = plt.cm.tab20(k % 20)
            ax.plot(xs, ys, "-", color=colour, alpha=0.5, lw=1)
            ax.plot(xs, ys, "o", color=colour, ms=5, label=patient if len(patients) <= 12 else None)
        means = [np.nanmean([v for v in per_patient[(budget, a)].values() if v is not None] or [np.nan])
                 for a in present]
        ax.plot(range(len(present)), means, "k_", ms=28, mew=2.5, label="mean")
        ax.set_xticks(range(len(present)), present, rotation=20)
        ax.set_xlim(-0.5, len(present) - 0.5)
        ax.set_title(f"budget {budget} annotated slides")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test Dice per patient (mean over seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7, loc="lower right", ncol=2)
    _save(fig, path)


def sample_grid(preview: Path | None, path: Path, store: Path | None = None, tiles_dir: Path | None = None) -> None:
    """The synthesis preview (layout | style tiles | generated) of a budget; rebuilt from the store
    when the preview PNG is missing, a placeholder when both are."""
    if preview is not None and Path(preview).is_file():
        with atomic_output(path) as tmp:
            shutil.copyfile(preview, tmp)
        return
    if store is not None and Path(store).is_dir():
        from stedm.synthesis.merge import write_preview

        write_preview(Path(store), tiles_dir, path)
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2))
    _placeholder(ax, f"no synthetic samples ({preview} missing)")
    _save(fig, path)


def _smooth(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 50)
    return np.convolve(values, np.ones(window) / window, mode="valid") if window > 1 else values


def _curve(ax: Any, history: list[dict[str, Any]], key: str, label: str, colour: Any) -> bool:
    points = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
    if not points:
        return False
    steps, values = np.asarray(points, dtype=float).T
    smooth = _smooth(values)
    ax.plot(steps[: len(smooth)] + (len(steps) - len(smooth)) // 2, smooth, color=colour, label=label, lw=1.2)
    return True


def plot_training_curves(stedm: dict[int, list[dict[str, Any]]], autoencoder: list[dict[str, Any]],
                         segmentation: dict[tuple[int, str], dict[str, Any]], path: Path) -> None:
    """2 x 2 panels: STEDM loss per budget, autoencoder loss, segmentation train loss and val Dice.

    Args:
        stedm: budget -> training history (`stedm_run.json` "history").
        autoencoder: the autoencoder's training history (empty for a pretrained one).
        segmentation: (budget, arm) -> `training.json` (first seed): "history", "val_history".
    """
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a_stedm, a_ae), (a_seg, a_val) = axes
    drawn = [_curve(a_stedm, h, "loss", f"budget {b}", plt.cm.tab10(k)) for k, (b, h) in enumerate(sorted(stedm.items()))]
    if any(drawn):
        a_stedm.set(title="STEDM denoiser loss (moving average)", xlabel="step", ylabel="loss")
        a_stedm.legend(fontsize=8)
    else:
        _placeholder(a_stedm, "no STEDM training history")
    if _curve(a_ae, autoencoder, "loss", "autoencoder", "C0"):
        a_ae.set(title="autoencoder loss (moving average)", xlabel="step", ylabel="loss")
        a_ae.set_yscale("log")
    else:
        _placeholder(a_ae, "no autoencoder training history (pretrained or missing)")
    any_seg = any_val = False
    for k, ((budget, arm), info) in enumerate(sorted(segmentation.items())):
        colour, label = plt.cm.tab10(k % 10), f"{budget} / {arm}"
        any_seg |= _curve(a_seg, info.get("history", []), "loss", label, colour)
        val = [(v["step"], v.get("dice")) for v in info.get("val_history", []) if v.get("dice") is not None]
        if val:
            a_val.plot(*np.asarray(val, dtype=float).T, "o-", color=colour, label=label, ms=3)
            any_val = True
    if any_seg:
        a_seg.set(title="segmentation training loss (first seed)", xlabel="step", ylabel="loss")
        a_seg.legend(fontsize=7)
    else:
        _placeholder(a_seg, "no segmentation training history")
    if any_val:
        a_val.set(title="segmentation validation Dice (first seed)", xlabel="step", ylabel="Dice", ylim=(0, 1))
        a_val.legend(fontsize=7)
    else:
        _placeholder(a_val, "no validation history")
    _save(fig, path)


def overlay_sheet(rows: list[tuple[str, list[Path]]], path: Path, thumb: int = 240) -> None:
    """Contact sheet: one row per model (label, overlay PNGs of its test slides), thumbnails side by side."""
    label_w, gap = 150, 6
    cells = []
    for label, paths in rows:
        images = []
        for png in paths:
            with Image.open(png) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))  # never upscales: small overlays stay small
                images.append(im)
        cells.append((label, images))
    col_w = max([im.width for _, ims in cells for im in ims] + [thumb // 2])
    row_h = [max([im.height for im in ims] + [40]) for _, ims in cells] or [40]
    n_cols = max([len(ims) for _, ims in cells] + [1])
    sheet = Image.new("RGB", (label_w + n_cols * (col_w + gap) + gap, sum(row_h) + gap * (len(row_h) + 1)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if not cells:
        draw.text((10, 10), "no prediction overlays", fill=(80, 80, 80))
    y = gap
    for (label, images), h in zip(cells, row_h, strict=True):
        draw.text((6, y + h // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            sheet.paste(im, (label_w + gap + c * (col_w + gap), y))
        if not images:
            draw.text((label_w + gap, y + h // 2 - 6), "missing", fill=(160, 0, 0))
        y += h + gap
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    log.info("wrote %s (%d models)", path, len(rows))
