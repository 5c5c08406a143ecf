"""The STEDM model: style encoder + aggregation + layout/style-conditioned latent denoiser.

`StedmModel` is built from a JSON-serialisable `StedmModelConfig` and saved as a directory with
`config.json` and `model.safetensors`. Loading is strict: every key and shape must match the
config, otherwise a StedmError lists what is missing, unexpected or mis-shaped (the official code
loaded with strict=False and silently left blocks at random initialisation).

Conditioning (`encode_style`):
- `embedding` injection: one style vector per sample, (B, style_dim).
- `cross_attention` injection: tokens (B, 1 + n, style_dim) = the aggregated vector followed by
  the n per-tile vectors (so the aggregation block is trained on this path too).

Null style (classifier-free guidance; samples in `drop_mask` get it during training):
- `constant_image` (default, the paper's): the encoder + aggregation output for a style set of
  constant -2 images (outside the [-1, 1] image range, so it never coincides with a real tile).
  It is a function of the trained encoder, so it moves with it and needs no extra parameters.
- `learned`: a learned vector (repeated to the token count for cross-attention); independent of
  the encoder, useful when the encoder is frozen.
With aggregation `none` the condition is always zero (layout-only baseline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stedm.errors import StedmError
from stedm.models.denoiser import StyleDenoiser
from stedm.models.presets import LAYOUT_MODES, StedmModelConfig, config_differences
from stedm.models.style import StyleEncoder, build_aggregation

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NULL_STYLE_VALUE = -2.0  # the paper's dropped-style image: constant 0 - 0.5, then the x*2-1 rescale


class StedmModel(nn.Module):
    """Style encoder + aggregation + denoiser, built from a `StedmModelConfig`.

    Args:
        config: the architecture (saved as config.json).
        style_encoder_weights: optional local state-dict file for a torchvision style backbone
            (initialisation only; the trained weights live in model.safetensors).
    """

    def __init__(
        self, *, config: StedmModelConfig, style_encoder_weights: str | Path | None = None
    ):
        super().__init__()
        self.config = config
        c = config
        # `none` never looks at the style tiles, so it carries no encoder (no unused parameters).
        self.style_encoder = (
            None
            if c.aggregation == "none"
            else StyleEncoder(
                backbone=c.style_encoder,
                dim=c.style_dim,
                weights_path=style_encoder_weights,
                cnn_channels=c.cnn_channels,
            )
        )
        self.aggregation = build_aggregation(
            c.aggregation, c.style_dim, c.n_style, heads=c.attention_heads
        )
        self.null_embedding = (
            nn.Parameter(torch.randn(c.style_dim) * c.style_dim**-0.5)
            if c.null_style == "learned" and c.aggregation != "none"
            else None
        )
        self.denoiser = StyleDenoiser(
            config=c.denoiser,
            latent_channels=c.latent_channels,
            n_layout_channels=c.n_layout_channels,
            style_injection=c.style_injection,
            style_dim=c.style_dim,
            sample_size=c.latent_size,
        )
        if c.freeze_style:
            for module in (self.style_encoder, self.aggregation):
                if module is not None:
                    module.requires_grad_(False)

    # ---- conditioning -------------------------------------------------------------------------
    def _zero_cond(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        shape = (batch, self.config.style_dim)
        if self.config.style_injection == "cross_attention":
            shape = (batch, 1, self.config.style_dim)
        return torch.zeros(shape, device=device, dtype=dtype)

    def _learned_null(self, like: torch.Tensor) -> torch.Tensor:
        return self.null_embedding.to(like.dtype).expand_as(like)

    def encode_style(
        self, style_set: torch.Tensor, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Style set (B, n, 3, H, W) in [-1, 1] -> condition; `drop_mask` (B,) bool -> null style.

        Returns (B, style_dim) for `embedding`, (B, 1 + n, style_dim) for `cross_attention`.
        """
        if style_set.ndim != 5:
            raise StedmError(
                f"style set must be (B, n, 3, H, W), got shape {tuple(style_set.shape)}"
            )
        b = style_set.shape[0]
        if self.style_encoder is None:  # aggregation `none`
            return self._zero_cond(b, style_set.device, style_set.dtype)
        if drop_mask is not None:
            drop_mask = drop_mask.to(device=style_set.device, dtype=torch.bool).view(b)
            if self.config.null_style == "constant_image":
                null_images = torch.full_like(style_set, NULL_STYLE_VALUE)
                style_set = torch.where(drop_mask.view(b, 1, 1, 1, 1), null_images, style_set)
        tokens = self.style_encoder(style_set)
        vector = self.aggregation(tokens)
        cond = (
            vector
            if self.config.style_injection == "embedding"
            else torch.cat([vector[:, None], tokens], 1)
        )
        if drop_mask is not None and self.config.null_style == "learned":
            keep = drop_mask.view(b, *([1] * (cond.ndim - 1)))
            cond = torch.where(keep, self._learned_null(cond), cond)
        return cond

    def null_cond(
        self,
        batch: int,
        *,
        n_style: int | None = None,
        style_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The unconditional (null-style) condition for `batch` samples.

        For cross-attention the token count follows `n_style` (default: config.n_style) so it can
        be batched with real conditions of the same set size.
        """
        device = device if device is not None else next(self.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        if self.style_encoder is None:
            return self._zero_cond(batch, torch.device(device), dtype)
        n = n_style or self.config.n_style
        size = style_size or self.config.style_size
        if self.config.null_style == "constant_image":
            images = torch.full(
                (batch, n, 3, size, size), NULL_STYLE_VALUE, device=device, dtype=dtype
            )
            return self.encode_style(images)
        shape = (batch, self.config.style_dim)
        if self.config.style_injection == "cross_attention":
            shape = (batch, n + 1, self.config.style_dim)
        return self._learned_null(torch.empty(shape, device=device, dtype=dtype))

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        layout_onehot: torch.Tensor,
        style_set: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
        *,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ε. The layout may be at image or latent resolution (resized here).

        Style: a precomputed `cond` (e.g. reused across sampling steps), else `style_set` (with
        optional `drop_mask`), else the null style.
        """
        if cond is None:
            if style_set is not None:
                cond = self.encode_style(style_set, drop_mask)
            else:
                cond = self.null_cond(noisy_latents.shape[0], device=noisy_latents.device)
        if layout_onehot.shape[-2:] != noisy_latents.shape[-2:]:
            layout_onehot = resize_layout(layout_onehot, tuple(noisy_latents.shape[-2:]))
        return self.denoiser(noisy_latents, timesteps, layout_onehot, cond)

    # ---- parameters ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that should be optimised: denoiser, style encoder, aggregation, null.

        (The official code handed only the UNet to the optimiser, so its style encoder and
        aggregation block never learned.)
        """
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        def count(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        return {
            "denoiser": count(self.denoiser),
            "style_encoder": count(self.style_encoder),
            "aggregation": count(self.aggregation),
            "total": count(self),
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
        }

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` and `model.safetensors` into directory `path` (atomic per file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, "_format_version": 1, **self.config.to_dict()}
        tmp = path / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, path / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_NAME)

    @staticmethod
    def read_config(path: str | Path) -> StedmModelConfig:
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise StedmError(f"STEDM model directory {path} has no {CONFIG_NAME}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise StedmError(f"{file} is not valid JSON: {exc}") from exc
        if data.get("_class_name") != "StedmModel":
            raise StedmError(f"{file}: _class_name {data.get('_class_name')!r} is not 'StedmModel'")
        return StedmModelConfig.from_dict(data, source=str(file))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        config: StedmModelConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> StedmModel:
        """Load a `save_pretrained` directory, strictly.

        Args:
            path: the directory.
            config: the configuration the caller expects; a StedmError lists every field where the
                saved config differs (e.g. loading a `linear` checkpoint as a `mean` model).
            device: where to put the weights.
        """
        saved = cls.read_config(path)
        if config is not None and config != saved:
            raise StedmError(
                f"checkpoint {path} was saved with a different model config: "
                + "; ".join(
                    f"{d} (checkpoint vs requested)" for d in config_differences(saved, config)
                )
            )
        model = cls(config=saved)
        model.load_weights(path, device=device)
        return model.to(device)

    def load_weights(self, path: str | Path, *, device: str | torch.device = "cpu") -> None:
        """Load `model.safetensors` (or a directory holding it) into this model, strictly."""
        path = Path(path)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if not file.is_file():
            raise StedmError(f"STEDM weights not found: {file}")
        state = load_file(str(file), device=str(device))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(state))
            if state[k].shape != own[k].shape
        ]
        if missing or unexpected or mismatched:

            def show(keys: list[str]) -> str:
                more = f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                return "[" + ", ".join(keys[:8]) + more + "]"

            raise StedmError(
                f"weights {file} do not match the model config (tampered or mismatched checkpoint): "
                f"missing keys {show(missing)}; unexpected keys {show(unexpected)}; "
                f"shape mismatches (file vs model) {show(mismatched)}"
            )
        self.load_state_dict(state, strict=True)


# ---- layout helpers ---------------------------------------------------------------------------
def n_layout_channels(mode: str, n_classes: int) -> int:
    """Channels of the layout one-hot: 2 for `binary`, n_classes for `classes`."""
    if mode not in LAYOUT_MODES:
        raise StedmError(f"unknown layout mode {mode!r}; allowed: {list(LAYOUT_MODES)}")
    return 2 if mode == "binary" else n_classes


def layout_to_onehot(
    labels: torch.Tensor,
    *,
    mode: str,
    foreground_indices: tuple[int, ...] | list[int],
    n_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Label maps (B, H, W) (uint8/int) -> one-hot (B, C, H, W) float.

    `binary` (the paper's generator condition): channel 0 = background (any non-foreground
    class), channel 1 = any class in `foreground_indices`. `classes`: one channel per class.
    Pixels equal to `ignore_index` get the all-zero vector (the model sees "unknown").
    """
    if labels.ndim != 3:
        raise StedmError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    labels = labels.long()
    ignore = labels == ignore_index
    bad = (~ignore) & ((labels < 0) | (labels >= n_classes))
    if bad.any():
        values = sorted(set(labels[bad].unique().tolist()))[:10]
        raise StedmError(
            f"label values {values} outside 0..{n_classes - 1} (ignore_index {ignore_index})"
        )
    valid = (~ignore).unsqueeze(1).float()
    if mode == "binary":
        fg = torch.isin(
            labels,
            torch.as_tensor(list(foreground_indices), device=labels.device, dtype=torch.long),
        )
        fg = fg.unsqueeze(1).float()
        return torch.cat([1.0 - fg, fg], dim=1) * valid
    if mode == "classes":
        onehot = F.one_hot(labels.clamp(0, n_classes - 1), n_classes).permute(0, 3, 1, 2).float()
        return onehot * valid
    raise StedmError(f"unknown layout mode {mode!r}; allowed: {list(LAYOUT_MODES)}")


def resize_layout(
    onehot: torch.Tensor, latent_hw: tuple[int, int], *, mode: str = "area"
) -> torch.Tensor:
    """Resize a layout one-hot to latent resolution.

    `area` (default) averages the one-hot over each latent cell, giving class fractions that keep
    thin structures visible and sum to the valid fraction; `nearest` keeps a hard one-hot.
    """
    if mode not in ("area", "nearest"):
        raise StedmError(f"unknown layout resize mode {mode!r}; allowed: ['area', 'nearest']")
    return F.interpolate(onehot.float(), size=tuple(latent_hw), mode=mode)


def diffusion_loss(
    model: StedmModel,
    scheduler: Any,
    latents: torch.Tensor,
    layout_onehot: torch.Tensor,
    style_set: torch.Tensor | None,
    *,
    drop_mask: torch.Tensor | None = None,
    loss: str = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One diffusion loss: t ~ U{0..T-1}, z_t = add_noise(z, ε, t), mean |target - pred| (or
    squared), where the target is ε or v as the scheduler's `prediction_type` says.

    `latents` are already scaled (`autoencoder.encode`); `scheduler` is `make_noise_scheduler()`.
    """
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    t = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (latents.shape[0],),
        generator=generator,
        device=latents.device,
    )
    noisy = scheduler.add_noise(latents, noise, t)
    pred = model(noisy, t, layout_onehot, style_set, drop_mask).float()
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, t)
    if loss == "l1":
        return (pred - target.float()).abs().mean()
    if loss == "l2":
        return ((pred - target.float()) ** 2).mean()
    raise StedmError(f"unknown diffusion loss {loss!r}; allowed: ['l1', 'l2']")
