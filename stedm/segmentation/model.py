"""Segmentation models: segmentation-models-pytorch U-Nets built from named presets.

- `paper`: `smp.Unet("mit_b2")`, a U-Net decoder on a SegFormer MiT-B2 encoder (the paper's
  model; ImageNet weights only through `segmentation.encoder_weights`, a local file).
- `demo`: a MobileNetV3-small encoder cut after its third stage (output stride 8) with a thin
  decoder (32, 16, 8). Benchmarked on 2 CPU threads, batch 8 at 128 px: ~0.07 s per training
  step with channels-last weights (0.11 s without), against ~0.35 s for a ResNet-18 U-Net cut the
  same way and ~0.2 s with (64, 32, 16) decoder channels; MiT-B2 needs ~20x that. Stride 8 at 1 µm/px still sees ~100 µm of context,
  enough to tell tumour from stroma texture on the demo slides.

A trained model is a folder (diffusers-style): `model.safetensors` (the smp weights) and
`config.json` (`SegModelConfig`: architecture, output classes, and the tile µm/px and size the
model was trained at, which whole-slide inference reuses). Inputs are RGB scaled to [-1, 1]
(no ImageNet normalisation, as the paper). Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from stedm.errors import StedmError

if TYPE_CHECKING:
    from stedm.config import LabelsConfig, SegmentationConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TARGETS = ("binary", "classes")

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"encoder_name": "tu-mobilenetv3_small_100", "encoder_depth": 3, "decoder_channels": (32, 16, 8)},
    "paper": {"encoder_name": "mit_b2", "encoder_depth": 5, "decoder_channels": (256, 128, 64, 32, 16)},
}


@dataclass(frozen=True)
class SegModelConfig:
    """Everything needed to rebuild a trained model and use it on a slide (round-trips to JSON).

    Attributes:
        class_names: names of the output channels (binary: background, then the foreground).
        foreground: output channels that count as foreground in the binary evaluation.
        tile_size, tile_mpp: window size in px and µm/px the model was trained at.
    """

    encoder_name: str
    encoder_depth: int
    decoder_channels: tuple[int, ...]
    classes: int
    class_names: tuple[str, ...]
    foreground: tuple[int, ...]
    target: str = "binary"
    preset: str = "demo"
    tile_size: int = 128
    tile_mpp: float = 1.0
    in_channels: int = 3
    arch: str = "Unet"
    input_range: tuple[float, float] = (-1.0, 1.0)

    @classmethod
    def from_workflow(
        cls, seg: SegmentationConfig, labels: LabelsConfig, *, tile_size: int, tile_mpp: float
    ) -> SegModelConfig:
        """The model of the `segmentation` config section for tiles of `tile_size` px at `tile_mpp`."""
        if seg.preset not in PRESETS:
            raise StedmError(f"config key 'segmentation.preset': {seg.preset!r} is not one of {list(PRESETS)}")
        if seg.target not in TARGETS:
            raise StedmError(f"config key 'segmentation.target': {seg.target!r} is not one of {list(TARGETS)}")
        preset = dict(PRESETS[seg.preset])
        if seg.encoder:
            preset["encoder_name"] = seg.encoder
        if seg.target == "binary":
            names = ("background", "+".join(labels.foreground))
            classes, foreground = 2, (1,)
        else:
            names, classes, foreground = tuple(labels.classes), len(labels.classes), labels.foreground_indices
        stride = 2 ** preset["encoder_depth"]
        if tile_size % stride:
            raise StedmError(
                f"tile size {tile_size} px is not a multiple of the model's output stride {stride} "
                f"(segmentation.preset {seg.preset!r}); choose tiling.tile_size as a multiple of {stride}"
            )
        return cls(classes=classes, class_names=names, foreground=tuple(foreground), target=seg.target,
                   preset=seg.preset, tile_size=int(tile_size), tile_mpp=float(tile_mpp), **preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)


def build_model(cfg: SegModelConfig) -> torch.nn.Module:
    """A randomly initialised smp model (seed torch beforehand for a reproducible init)."""
    import segmentation_models_pytorch as smp

    if cfg.arch != "Unet":
        raise StedmError(f"unsupported segmentation architecture {cfg.arch!r} (supported: Unet)")
    try:
        model = smp.Unet(
            encoder_name=cfg.encoder_name,
            encoder_depth=cfg.encoder_depth,
            encoder_weights=None,  # never a hub download: local weights via load_encoder_weights
            decoder_channels=tuple(cfg.decoder_channels),
            in_channels=cfg.in_channels,
            classes=cfg.classes,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StedmError(
            f"cannot build a U-Net with encoder {cfg.encoder_name!r} (depth {cfg.encoder_depth}): {exc}; "
            "set segmentation.encoder to an encoder segmentation-models-pytorch knows"
        ) from exc
    # channels-last convolution weights: on CPU (oneDNN) the demo model trains ~1.5x and predicts
    # ~1.7x faster (measured: 0.07 vs 0.105 s per step); also the layout CUDA prefers under AMP.
    return model.to(memory_format=torch.channels_last)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise StedmError(f"{path} holds no state dict (got {type(data).__name__})")
    return data


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local encoder state dict strictly into `model.encoder`.

    Accepts `.safetensors` or a torch file (a state dict, or {"state_dict": ...}); keys may carry
    an `encoder.` prefix (a whole smp model's encoder part).

    Raises:
        StedmError: missing file, or keys / shapes that do not match the encoder.
    """
    path = Path(path)
    if not path.is_file():
        raise StedmError(f"config key 'segmentation.encoder_weights': file not found: {path}")
    state = _read_state_dict(path)
    if state and all(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items()}
    own = model.encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items
        )
        raise StedmError(
            f"{path} does not match the {type(model.encoder).__name__} encoder: {detail}; "
            "export the state dict of the same encoder as segmentation.encoder / the preset"
        )
    model.encoder.load_state_dict(state, strict=True)
    log.info("loaded encoder weights from %s (%d tensors)", path, len(state))


def save_model(model: torch.nn.Module, cfg: SegModelConfig, folder: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model.safetensors` (or the given state dict) and `config.json` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, SegModelConfig]:
    """Rebuild a saved model (eval mode) and its config."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise StedmError(f"{folder} is not a trained segmentation model (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = SegModelConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.to(device).eval(), cfg
