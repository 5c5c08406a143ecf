"""Model configuration as plain data: named presets (`tiny`, `paper`) and `StedmModelConfig`.

A preset fixes the *architecture* numbers that the workflow config does not expose (channel
widths, depths, style dimension). The workflow config (`stedm.config`) still chooses the options
that are experiment factors (aggregation, style injection, encoder backbone, n_style, ...).

- `tiny` is the CPU demo: 128 px tiles, f=4 autoencoder -> 32x32x4 latents, a ~2 M parameter
  denoiser without attention at the top resolution (self-attention on a 32x32 latent dominates
  CPU time; see shared/reference/platform-notes.md).
- `paper` mirrors the official STEDM configuration (LDM VQ-f4 first stage, 128-channel UNet with
  multipliers [1, 4, 8], attention only in the middle block, Swin-V2-T style encoder with a 512-d
  head, n = 10 style tiles, 512 px tiles -> 128x128x3 latents).

`StedmModelConfig` is the JSON-serialisable description of one STEDM model (what
`StedmModel.save_pretrained` writes as config.json); `from_preset` fills it from a preset and
`from_workflow` from the workflow's `stedm` config section.

This module imports nothing heavy (no torch): it is safe to read from Snakemake rules or the CLI.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from stedm.errors import StedmError

# Allowed values of the model options (the workflow schema offers the same names).
LAYOUT_MODES = ("binary", "classes")
INJECTIONS = ("embedding", "cross_attention")
AGGREGATIONS = ("none", "mean", "max", "linear", "attention")
BACKBONES = ("cnn", "resnet18", "swin_v2_t")
NULL_STYLES = ("constant_image", "learned")


@dataclass(frozen=True)
class AutoencoderPreset:
    """Architecture of the f=4 first-stage autoencoder (diffusers AutoencoderKL / VQModel)."""

    # Three blocks = two 2x downsamplings = f=4, the factor the paper's VQ-f4 uses: histology
    # texture (nuclei are a few pixels wide) does not survive f=8.
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    num_vq_embeddings: int
    norm_num_groups: int
    # Self-attention in the AE middle block runs at 1/4 resolution: LDM's VQ-f4 has it; the tiny
    # preset drops it because it costs more CPU time than it buys at 128 px.
    mid_block_add_attention: bool


@dataclass(frozen=True)
class StylePreset:
    """Style encoder + aggregation defaults."""

    backbone: str  # cnn | resnet18 | swin_v2_t
    dim: int  # style vector size
    n_style: int  # tiles per style set (multi-patch sampling)
    style_size: int  # side of a style tile in pixels (used to build the null style image)
    cnn_channels: tuple[int, ...]  # widths of the `cnn` backbone's strided stages
    attention_heads: int  # heads of the `attention` aggregation


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of the latent denoiser (a diffusers UNet); stored in the model's config.json."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    # Self-attention in the middle (lowest-resolution) block, as in the paper's UNet.
    mid_attention: bool = True
    # Number of attention heads (middle block and cross-attention blocks).
    attention_heads: int = 4
    # Resolution levels (0 = full latent resolution) that get cross-attention blocks when the
    # style is injected as tokens (`style_injection: cross_attention`). Only lower resolutions:
    # a transformer block also carries self-attention, which is expensive at full resolution.
    cross_attention_levels: tuple[int, ...] = (1, 2)
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        object.__setattr__(
            self, "cross_attention_levels", tuple(int(c) for c in self.cross_attention_levels)
        )
        n = len(self.block_out_channels)
        if n < 1 or any(c <= 0 for c in self.block_out_channels):
            raise StedmError(
                f"denoiser.block_out_channels must be positive, got {self.block_out_channels}"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise StedmError(
                f"denoiser.block_out_channels {self.block_out_channels} must be divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if self.layers_per_block < 1:
            raise StedmError(f"denoiser.layers_per_block must be >= 1, got {self.layers_per_block}")
        bad = [lvl for lvl in self.cross_attention_levels if not 0 <= lvl < n]
        if bad:
            raise StedmError(f"denoiser.cross_attention_levels {bad} outside 0..{n - 1}")
        if any(c % self.attention_heads for c in self.block_out_channels):
            raise StedmError(
                f"denoiser.attention_heads={self.attention_heads} must divide every block width "
                f"{self.block_out_channels}"
            )


@dataclass(frozen=True)
class Preset:
    name: str
    autoencoder: AutoencoderPreset
    style: StylePreset
    denoiser: DenoiserConfig
    tile_size: int  # image side in pixels the preset is sized for
    latent_size: int  # tile_size / 4


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        autoencoder=AutoencoderPreset(
            # ~1 M params, ~1 s per training step at batch 8 on 128 px (CPU, 2 threads).
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            num_vq_embeddings=512,  # the demo cohort has few colours; 8192 codes would go unused
            norm_num_groups=32,
            mid_block_add_attention=False,
        ),
        style=StylePreset(
            # A small strided CNN whose per-channel feature statistics (mean/std, the quantities
            # AdaIN/Gram style losses use) describe stain colour and texture; trains from scratch.
            backbone="cnn",
            dim=128,  # = the tiny UNet's time-embedding width (4 x 32)
            n_style=4,  # = the workflow default stedm.n_style
            style_size=128,
            # Four narrow stages: statistics at four scales (up to a ~31 px receptive field) for
            # ~0.05 s of a training step at batch 8 x 4 tiles of 128 px; (32, 64, 128) costs 3x.
            cnn_channels=(16, 32, 64, 128),
            attention_heads=4,
        ),
        denoiser=DenoiserConfig(
            # ~2 M params, ~0.2 s per training step at batch 8 on a 32x32x4 latent: no attention at
            # the top level, self-attention only in the 8x8 middle block.
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            mid_attention=True,
            attention_heads=4,
            cross_attention_levels=(1, 2),
            norm_num_groups=32,
        ),
        tile_size=128,
        latent_size=32,
    ),
    "paper": Preset(
        name="paper",
        autoencoder=AutoencoderPreset(
            # LDM VQ-f4: ch 128, ch_mult [1, 2, 4], 2 res-blocks, z = embed_dim = 3, 8192 codes.
            block_out_channels=(128, 256, 512),
            layers_per_block=2,
            latent_channels=3,
            num_vq_embeddings=8192,
            norm_num_groups=32,
            mid_block_add_attention=True,
        ),
        style=StylePreset(
            # Swin-V2-T with its head replaced by Linear(768 -> 512), n = 10 tiles (multi-patch).
            backbone="swin_v2_t",
            dim=512,
            n_style=10,
            style_size=512,
            cnn_channels=(16, 32, 64, 128),  # unused by swin_v2_t
            attention_heads=8,
        ),
        denoiser=DenoiserConfig(
            # LDM landscape UNet: model_channels 128, channel_mult [1, 4, 8], 2 res-blocks, 8
            # heads; its attention_resolutions never match, so attention is in the middle only.
            block_out_channels=(128, 512, 1024),
            layers_per_block=2,
            mid_attention=True,
            attention_heads=8,
            cross_attention_levels=(2,),
            norm_num_groups=32,
        ),
        tile_size=512,
        latent_size=128,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; StedmError naming the allowed names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise StedmError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class StedmModelConfig:
    """Everything needed to rebuild a `StedmModel`; round-trips through JSON (`to_dict`/`from_dict`)."""

    preset: str = "tiny"
    latent_channels: int = 4
    latent_size: int = 32
    layout: str = "binary"  # binary | classes
    n_layout_channels: int = 2
    style_injection: str = "embedding"  # embedding | cross_attention
    aggregation: str = "linear"  # none | mean | max | linear | attention
    style_encoder: str = "cnn"  # cnn | resnet18 | swin_v2_t
    style_dim: int = 128
    n_style: int = 4
    style_size: int = 128
    cnn_channels: tuple[int, ...] = (16, 32, 64, 128)
    attention_heads: int = 4  # of the `attention` aggregation
    freeze_style: bool = False
    null_style: str = "constant_image"  # constant_image | learned
    # What the denoiser predicts: the paper's ε, or v (= sqrt(a) ε - sqrt(1-a) x0). Under the
    # paper's schedule (alpha_bar_T ~ 1e-4) an ε-model trained from scratch for a few thousand
    # steps predicts ε too imprecisely at high noise, so sampling drifts off the data (latent std
    # ~3 instead of ~1 on the demo); v-prediction keeps every noise level informative.
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cnn_channels", tuple(int(c) for c in self.cnn_channels))
        if isinstance(self.denoiser, dict):
            object.__setattr__(self, "denoiser", DenoiserConfig(**self.denoiser))
        for key, allowed in (
            ("layout", LAYOUT_MODES),
            ("style_injection", INJECTIONS),
            ("aggregation", AGGREGATIONS),
            ("style_encoder", BACKBONES),
            ("null_style", NULL_STYLES),
        ):
            if getattr(self, key) not in allowed:
                raise StedmError(
                    f"model config {key}={getattr(self, key)!r}; allowed: {list(allowed)}"
                )
        for key in (
            "latent_channels",
            "latent_size",
            "n_layout_channels",
            "style_dim",
            "n_style",
            "style_size",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StedmError(f"model config {key} must be >= 1, got {getattr(self, key)}")
        if self.layout == "binary" and self.n_layout_channels != 2:
            raise StedmError(
                f"model config: binary layout needs n_layout_channels=2, got {self.n_layout_channels}"
            )
        if self.aggregation == "attention" and self.style_dim % self.attention_heads:
            raise StedmError(
                f"model config: attention_heads={self.attention_heads} must divide style_dim={self.style_dim}"
            )

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides: Any) -> StedmModelConfig:
        """The preset's architecture, with any field overridden by keyword."""
        p = get_preset(preset)
        base = dict(
            preset=p.name,
            latent_channels=p.autoencoder.latent_channels,
            latent_size=p.latent_size,
            style_encoder=p.style.backbone,
            style_dim=p.style.dim,
            n_style=p.style.n_style,
            style_size=p.style.style_size,
            cnn_channels=p.style.cnn_channels,
            attention_heads=p.style.attention_heads,
            denoiser=p.denoiser,
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise StedmError(f"unknown model config keys {sorted(unknown)}")
        return cls(**{**base, **overrides})

    @classmethod
    def from_workflow(
        cls,
        section: Any,
        *,
        latent_channels: int,
        latent_size: int,
        n_layout_channels: int,
        style_size: int | None = None,
    ) -> StedmModelConfig:
        """From the workflow's `stedm` config section (a `StedmConfig` or its dict) + data facts.

        `style_sampling: none` forces aggregation `none`, as in the official code.
        """
        s = section if isinstance(section, dict) else dataclasses.asdict(section)
        aggregation = "none" if s.get("style_sampling") == "none" else s["aggregation"]
        return cls.from_preset(
            s["preset"],
            latent_channels=latent_channels,
            latent_size=latent_size,
            n_layout_channels=n_layout_channels,
            layout=s["layout"],
            style_injection=s["style_injection"],
            aggregation=aggregation,
            style_encoder=s["style_encoder"],
            # nearby / augmented sets hold one tile; n_style is the multi-patch set size
            n_style=s["n_style"] if s.get("style_sampling") == "multi_patch" else 1,
            freeze_style=s["freeze_style"],
            null_style=s.get("null_style", "constant_image"),
            prediction_type=s.get("prediction", "epsilon"),
            **({"style_size": style_size} if style_size else {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "model config") -> StedmModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise StedmError(f"{source}: unknown keys {unknown}, missing keys {missing}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a bad key inside `denoiser`
            raise StedmError(f"{source}: {exc}") from exc


def config_differences(a: StedmModelConfig, b: StedmModelConfig) -> list[str]:
    """Human-readable `key: a vs b` for every differing top-level field."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k]]
