"""Models: f=4 autoencoder, style encoder + aggregation, latent denoiser, the combined STEDM model.

Importing this package imports torch and diffusers; `stedm.models.presets` alone does not.
"""

from stedm.models.autoencoder import (
    autoencoder_kind,
    autoencoder_loss,
    build_autoencoder,
    compute_scaling_factor,
    decode,
    encode,
    get_scaling_factor,
    load_autoencoder,
    set_scaling_factor,
)
from stedm.models.denoiser import NOISE_SCHEDULE, StyleDenoiser, make_noise_scheduler
from stedm.models.presets import PRESETS, DenoiserConfig, get_preset
from stedm.models.stedm import (
    NULL_STYLE_VALUE,
    StedmModel,
    StedmModelConfig,
    diffusion_loss,
    layout_to_onehot,
    n_layout_channels,
    resize_layout,
)
from stedm.models.style import StyleEncoder, build_aggregation

__all__ = [
    "NOISE_SCHEDULE",
    "NULL_STYLE_VALUE",
    "PRESETS",
    "DenoiserConfig",
    "StedmModel",
    "StedmModelConfig",
    "StyleDenoiser",
    "StyleEncoder",
    "autoencoder_kind",
    "autoencoder_loss",
    "build_aggregation",
    "build_autoencoder",
    "compute_scaling_factor",
    "decode",
    "diffusion_loss",
    "encode",
    "get_preset",
    "get_scaling_factor",
    "layout_to_onehot",
    "load_autoencoder",
    "make_noise_scheduler",
    "n_layout_channels",
    "resize_layout",
    "set_scaling_factor",
]
