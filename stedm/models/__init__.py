"""Models: f=4 autoencoder, style encoder + aggregation, latent denoiser, the combined STEDM model.

Names are imported lazily (PEP 562), so `import stedm.models.presets` (plain data) does not pay
for importing torch and diffusers; `from stedm.models import StedmModel` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # autoencoder.py
    "autoencoder_kind": "autoencoder",
    "autoencoder_loss": "autoencoder",
    "build_autoencoder": "autoencoder",
    "compute_scaling_factor": "autoencoder",
    "decode": "autoencoder",
    "encode": "autoencoder",
    "get_scaling_factor": "autoencoder",
    "load_autoencoder": "autoencoder",
    "set_scaling_factor": "autoencoder",
    # denoiser.py
    "NOISE_SCHEDULE": "denoiser",
    "StyleDenoiser": "denoiser",
    "make_noise_scheduler": "denoiser",
    # presets.py
    "PRESETS": "presets",
    "DenoiserConfig": "presets",
    "StedmModelConfig": "presets",
    "get_preset": "presets",
    # stedm.py
    "NULL_STYLE_VALUE": "stedm",
    "StedmModel": "stedm",
    "diffusion_loss": "stedm",
    "layout_to_onehot": "stedm",
    "n_layout_channels": "stedm",
    "resize_layout": "stedm",
    # style.py
    "StyleEncoder": "style",
    "build_aggregation": "style",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stedm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stedm.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
