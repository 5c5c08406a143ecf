"""Latent denoiser (an ε-predicting diffusers UNet) and the paper's noise schedule.

Input: the noisy latent concatenated with the layout one-hot at latent resolution
(in_channels = latent_channels + n_layout_channels). The official code first maps the layout with
a 1x1 conv (2 -> 3 channels); the UNet's first conv subsumes that linear map.

The style enters through one of two named paths:
- `embedding` (the paper's spirit: one global style vector): the vector is projected with
  Linear -> SiLU -> Linear (diffusers' "projection" class embedding) and added to the timestep
  embedding, i.e. a per-channel shift in every ResNet block. The paper adds it once, in an extra
  bottleneck block; adding it everywhere is diffusers' standard path and is at least as
  expressive. Built on `UNet2DModel` (class_embed_type "identity" after our projection) because
  `UNet2DConditionModel` cannot have a self-attention middle block without cross-attention, and
  the paper's UNet has exactly that: attention in the middle block only.
- `cross_attention`: the style tokens (B, T, dim) are keys/values of cross-attention blocks
  (`UNet2DConditionModel`, cross_attention_dim = style dim) at the lower resolutions only
  (`DenoiserConfig.cross_attention_levels`) and in the middle block.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from stedm.errors import StedmError
from stedm.models.presets import INJECTIONS, DenoiserConfig

# The paper's diffusion process (LDM config): T = 1000, "linear" schedule
# beta_t = linspace(sqrt(0.0015), sqrt(0.0205), 1000)**2 -- which diffusers calls
# "scaled_linear" -- ε-prediction, no clipping of x0 (clip_denoised False in LDM).
NOISE_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_scheduler(
    kind: str = "ddpm", prediction_type: str = "epsilon"
) -> DDPMScheduler | DDIMScheduler:
    """The paper's noise schedule as a diffusers scheduler: "ddpm" (training) or "ddim" (sampling).

    The DDIM variant uses `set_alpha_to_one=False` and `steps_offset=1` like LDM's DDIM sampler
    (its last step uses alpha_cumprod[0], timesteps 1, 1+k, ...).
    """
    schedule = {**NOISE_SCHEDULE, "prediction_type": prediction_type}
    if kind == "ddpm":
        return DDPMScheduler(**schedule)
    if kind == "ddim":
        return DDIMScheduler(**schedule, set_alpha_to_one=False, steps_offset=1)
    raise StedmError(f"unknown scheduler kind {kind!r}; allowed: ['ddpm', 'ddim']")


class StyleDenoiser(nn.Module):
    """ε-prediction UNet conditioned on a layout (concatenated) and a style (embedding or tokens).

    Args:
        config: architecture (`DenoiserConfig`, from a preset).
        latent_channels: channels of the autoencoder latent (input and output).
        n_layout_channels: channels of the layout one-hot (2 for binary layouts).
        style_injection: "embedding" (cond is (B, style_dim)) or "cross_attention" (cond is
            (B, T, style_dim)).
        style_dim: size of a style vector / token.
        sample_size: latent side (metadata for diffusers; any size divisible by 2**(levels-1)
            works).
    """

    def __init__(
        self,
        *,
        config: DenoiserConfig,
        latent_channels: int,
        n_layout_channels: int,
        style_injection: str,
        style_dim: int,
        sample_size: int,
    ):
        super().__init__()
        if style_injection not in INJECTIONS:
            raise StedmError(
                f"unknown style_injection {style_injection!r}; allowed: {list(INJECTIONS)}"
            )
        self.style_injection = style_injection
        channels = tuple(config.block_out_channels)
        n = len(channels)
        common = dict(
            sample_size=sample_size,
            in_channels=latent_channels + n_layout_channels,
            out_channels=latent_channels,
            block_out_channels=channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
        )
        if style_injection == "embedding":
            time_embed_dim = 4 * channels[0]  # diffusers' (and LDM's) time-embedding width
            self.style_proj = TimestepEmbedding(style_dim, time_embed_dim)
            self.unet = UNet2DModel(
                **common,
                down_block_types=("DownBlock2D",) * n,
                up_block_types=("UpBlock2D",) * n,
                mid_block_type="UNetMidBlock2D",
                add_attention=config.mid_attention,
                # UNet2DModel's attention_head_dim is the real per-head width.
                attention_head_dim=channels[-1] // config.attention_heads,
                class_embed_type="identity",
            )
        else:
            levels = set(config.cross_attention_levels)
            down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
            up = tuple(
                "CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n))
            )
            self.style_proj = None
            self.unet = UNet2DConditionModel(
                **common,
                down_block_types=down,
                up_block_types=up,
                mid_block_type="UNetMidBlock2DCrossAttn",
                cross_attention_dim=style_dim,
                # Known diffusers naming quirk: in UNet2DConditionModel this is the head COUNT.
                attention_head_dim=config.attention_heads,
            )

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        layout: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Predict ε. `layout` must already be at latent resolution (B, n_layout, h, w)."""
        if (
            layout.shape[-2:] != noisy_latents.shape[-2:]
            or layout.shape[0] != noisy_latents.shape[0]
        ):
            raise StedmError(
                f"layout {tuple(layout.shape)} does not match latents {tuple(noisy_latents.shape)}"
            )
        x = torch.cat([noisy_latents, layout.to(noisy_latents.dtype)], dim=1)
        if self.style_injection == "embedding":
            if cond.ndim != 2:
                raise StedmError(
                    f"embedding injection needs a (B, dim) style, got {tuple(cond.shape)}"
                )
            return self.unet(x, timesteps, class_labels=self.style_proj(cond)).sample
        if cond.ndim != 3:
            raise StedmError(
                f"cross_attention injection needs (B, T, dim) tokens, got {tuple(cond.shape)}"
            )
        return self.unet(x, timesteps, encoder_hidden_states=cond).sample
