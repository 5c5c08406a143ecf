"""First-stage autoencoder: a diffusers `AutoencoderKL` or `VQModel` with downsampling factor 4.

STEDM diffuses in the latent space of a frozen f=4 autoencoder (the paper uses LDM's VQ-f4). We
build one from a preset (`tiny`, `paper`) to train it on the cohort, or load a local
diffusers-format directory (`save_pretrained` output) -- never from a hub.

Latent scaling: diffusion wants unit-variance latents. `compute_scaling_factor` returns 1/std of
a sample of (unscaled) latents; `set_scaling_factor` stores it in the model's diffusers config
(`scaling_factor`), so it is saved in `config.json` by `save_pretrained` and travels with the
weights. `encode` multiplies by it and `decode` divides by it (diffusers' convention), so callers
never handle the factor themselves. A freshly built model has scaling_factor 1.0 (the paper's
LDM config never rescales its VQ-f4 latents either).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from stedm.errors import StedmError
from stedm.models.presets import get_preset

Autoencoder = AutoencoderKL | VQModel

KINDS = ("kl", "vq")
_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
DOWNSAMPLING_FACTOR = 4


def build_autoencoder(kind: str, preset: str, *, sample_size: int | None = None) -> Autoencoder:
    """A randomly initialised f=4 autoencoder.

    Args:
        kind: "kl" (AutoencoderKL, Gaussian posterior) or "vq" (VQModel, codebook).
        preset: "tiny" or "paper" (see `stedm.models.presets`).
        sample_size: image side the model is meant for (metadata only); the preset's tile size
            when None.
    """
    p = get_preset(preset)
    a = p.autoencoder
    n = len(a.block_out_channels)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=a.block_out_channels,
        layers_per_block=a.layers_per_block,
        latent_channels=a.latent_channels,
        norm_num_groups=a.norm_num_groups,
        sample_size=sample_size or p.tile_size,
        scaling_factor=1.0,
        mid_block_add_attention=a.mid_block_add_attention,
    )
    if kind == "kl":
        return AutoencoderKL(**common)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=a.num_vq_embeddings)
    raise StedmError(f"unknown autoencoder kind {kind!r}; allowed: {list(KINDS)}")


def autoencoder_kind(ae: Autoencoder) -> str:
    """The kind ("kl" or "vq") of a model built or loaded here."""
    if isinstance(ae, AutoencoderKL):
        return "kl"
    if isinstance(ae, VQModel):
        return "vq"
    raise StedmError(f"not a supported autoencoder: {type(ae).__name__}")


def _check_config(path: Path, cfg: dict) -> None:
    cls = cfg.get("_class_name")
    if cls not in _CLASSES:
        raise StedmError(
            f"{path / 'config.json'}: _class_name {cls!r} is not an autoencoder we support "
            f"({sorted(_CLASSES)})"
        )
    blocks = cfg.get("block_out_channels") or [None]
    factor = 2 ** (len(blocks) - 1)
    if factor != DOWNSAMPLING_FACTOR:
        raise StedmError(
            f"{path / 'config.json'}: {len(blocks)} blocks give downsampling factor f={factor}; "
            f"STEDM needs f={DOWNSAMPLING_FACTOR} (3 blocks in block_out_channels)"
        )
    for key in ("in_channels", "out_channels"):
        if cfg.get(key, 3) != 3:
            raise StedmError(f"{path / 'config.json'}: {key}={cfg[key]}, expected 3 (RGB)")


def load_autoencoder(path: str | Path) -> Autoencoder:
    """Load a diffusers-format autoencoder directory offline, checking every weight.

    Raises:
        StedmError: the directory or its config.json is missing, the config does not describe an
            f=4 RGB AutoencoderKL/VQModel, or the weights do not match the config (missing,
            unexpected or mis-shaped tensors).
    """
    path = Path(path)
    if not path.is_dir():
        raise StedmError(f"autoencoder directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise StedmError(f"{path} has no config.json: not a diffusers save_pretrained directory")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise StedmError(f"{config_file} is not valid JSON: {exc}") from exc
    _check_config(path, cfg)
    cls = _CLASSES[cfg["_class_name"]]
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StedmError(f"cannot load autoencoder from {path}: {exc}") from exc
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise StedmError(f"autoencoder weights in {path} do not match its config.json: {problems}")
    return model.eval()


def get_scaling_factor(ae: Autoencoder) -> float:
    return float(ae.config.scaling_factor)


def set_scaling_factor(ae: Autoencoder, value: float) -> None:
    """Store the latent scaling factor in the model config (saved with `save_pretrained`)."""
    ae.register_to_config(scaling_factor=float(value))


def compute_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of a sample of *unscaled* latents (`encode(..., scaled=False)`)."""
    std = latents.detach().float().std().item()
    if not std > 1e-8:
        raise StedmError(
            f"latent std is {std}: cannot compute a scaling factor (collapsed encoder?)"
        )
    return 1.0 / std


def encode(ae: Autoencoder, images: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> latents (B, C, H/4, W/4).

    KL: the posterior mean (mode), deterministic. VQ: the pre-quantisation latents, as LDM
    diffuses them. `scaled` multiplies by the stored scaling factor (what diffusion wants).
    """
    if autoencoder_kind(ae) == "kl":
        z = ae.encode(images).latent_dist.mode()
    else:
        z = ae.encode(images).latents
    return z * get_scaling_factor(ae) if scaled else z


def decode(ae: Autoencoder, latents: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
    """Latents -> images clipped to [-1, 1]. VQ latents are quantised first (as in LDM/STEDM).

    `scaled` means the latents carry the scaling factor (came from `encode` or diffusion) and are
    divided by it first.
    """
    z = latents / get_scaling_factor(ae) if scaled else latents
    return ae.decode(z).sample.clamp(-1.0, 1.0)


def autoencoder_loss(
    ae: Autoencoder, images: torch.Tensor, *, kl_weight: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of the first stage and its parts (for logging).

    KL: mean L1 reconstruction + kl_weight * KL. LDM sums both the per-pixel L1 and the KL over a
    sample; we divide both by the number of pixel values (3*H*W), which keeps LDM's meaning of
    `kl_weight` (1e-6) while reporting the reconstruction as a readable per-pixel mean.
    VQ: mean L1 + the codebook/commitment loss returned by diffusers' quantiser (beta 0.25).
    No perceptual/adversarial term: those need downloaded network weights.
    """
    numel = images[0].numel()
    if autoencoder_kind(ae) == "kl":
        posterior = ae.encode(images).latent_dist
        recon = ae.decode(posterior.sample()).sample
        rec = (recon - images).abs().mean()
        kl = posterior.kl().mean() / numel
        loss = rec + kl_weight * kl
        return loss, {"loss": loss.item(), "rec_l1": rec.item(), "kl": kl.item()}
    h = ae.encode(images).latents
    out = ae.decode(h)
    rec = (out.sample - images).abs().mean()
    commit = out.commit_loss.mean()
    loss = rec + commit
    return loss, {"loss": loss.item(), "rec_l1": rec.item(), "commit": commit.item()}
