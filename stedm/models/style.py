"""Style encoder and aggregation block: a SET of style tiles -> one style vector (+ per-tile tokens).

A style query is a set of n tiles per sample, (B, n, 3, H, W) in [-1, 1]. `StyleEncoder` maps
every tile to a vector, giving (B, n, dim); an aggregation block merges the set into (B, dim).
Both are trained with the denoiser (the official code built them but never gave them to the
optimiser, so they stayed at their random initialisation; see stedm-method.md §1.5).

Aggregations (`build_aggregation`):
- `none`: the layout-only baseline; returns zeros and ignores its input.
- `mean`, `max`: permutation invariant, any n.
- `linear`: the paper's default; concatenates the n vectors *in order* (so it depends on the order
  and needs a fixed n) -> ReLU -> Linear(n*dim -> dim) -> ReLU -> Linear(dim -> dim). The official
  code ends with one more ReLU (non-negative style vectors); we drop it, the denoiser's projection
  follows anyway and a sign-free vector is the more common design.
- `attention`: a learned query token attends over the n vectors (no positional encoding), so it is
  permutation invariant and accepts any n.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from stedm.errors import StedmError
from stedm.models.presets import AGGREGATIONS, BACKBONES

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _mean_std(x: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and std of (N, C, H, W) -> (N, 2C): AdaIN-style statistics."""
    mean = x.mean(dim=(2, 3))
    std = (x.var(dim=(2, 3), unbiased=False) + 1e-5).sqrt()
    return torch.cat([mean, std], dim=1)


class StatsCNN(nn.Module):
    """A small strided CNN whose output is the mean/std of its features at every stage.

    Feature statistics are what AdaIN and Gram-matrix style losses compare: they describe colour
    (stain) and texture but not the arrangement of tissue, which is what a style code should
    carry. Statistics are taken *before* each GroupNorm (which would normalise them away), and the
    raw image's per-channel mean/std are included because stain colour is the dominant style cue
    in pathology.
    """

    def __init__(self, *, channels: tuple[int, ...] = (16, 32, 64, 128), groups: int = 8):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 3
        for i, c in enumerate(channels):
            self.convs.append(nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1))
            if i < len(channels) - 1:  # the last stage only feeds its statistics
                self.norms.append(nn.GroupNorm(min(groups, c), c))
            c_in = c
        self.out_features = 2 * (3 + sum(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = [_mean_std(x)]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            stats.append(_mean_std(x))
            if i < len(self.norms):
                x = nn.functional.silu(self.norms[i](x))
        return torch.cat(stats, dim=1)


def _load_backbone_weights(module: nn.Module, path: Path, head_prefix: str) -> None:
    """Strictly load a local state-dict file into a torchvision backbone (its classifier dropped)."""
    if not path.is_file():
        raise StedmError(f"style encoder weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise StedmError(f"cannot read style encoder weights {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    # The classifier head is replaced by our Linear(-> dim); its pretrained weights are unused.
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise StedmError(
            f"style encoder weights {path} do not match the backbone: "
            f"missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} "
            f"({len(unexpected)}), mismatched {mismatched[:8]} ({len(mismatched)})"
        )
    module.load_state_dict(state, strict=True)


class StyleEncoder(nn.Module):
    """Maps every tile of a style set to a vector: (B, n, 3, H, W) in [-1, 1] -> (B, n, dim).

    Args:
        backbone: "cnn" (small from-scratch CNN, the demo), "resnet18" or "swin_v2_t" (torchvision
            architectures, `weights=None`: nothing is downloaded; the paper's Swin-V2-T was also
            randomly initialised).
        dim: output vector size.
        weights_path: optional local state-dict file (.pt/.pth/.safetensors) for a torchvision
            backbone, loaded strictly (only its classifier head may be absent or differ).
        cnn_channels: stage widths of the `cnn` backbone.
    """

    def __init__(
        self,
        *,
        backbone: str = "cnn",
        dim: int = 128,
        weights_path: str | Path | None = None,
        cnn_channels: tuple[int, ...] = (16, 32, 64, 128),
    ):
        super().__init__()
        self.backbone_name = backbone
        if backbone == "cnn":
            if weights_path is not None:
                raise StedmError(
                    "style encoder 'cnn' trains from scratch: weights_path is not used"
                )
            self.backbone = StatsCNN(channels=tuple(cnn_channels))
            features = self.backbone.out_features
        elif backbone in ("resnet18", "swin_v2_t"):
            self.backbone = getattr(torchvision.models, backbone)(weights=None)
            head_name = "fc" if backbone == "resnet18" else "head"
            features = getattr(self.backbone, head_name).in_features
            setattr(self.backbone, head_name, nn.Identity())
            if weights_path is not None:
                _load_backbone_weights(
                    self.backbone, Path(weights_path), head_prefix=head_name + "."
                )
            # torchvision backbones see ImageNet-normalised inputs (what pretrained weights
            # expect); applied with or without weights so a checkpoint means the same either way.
            self.register_buffer("img_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
            self.register_buffer("img_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)
        else:
            raise StedmError(
                f"unknown style encoder backbone {backbone!r}; allowed: {list(BACKBONES)}"
            )
        self.head = nn.Linear(features, dim)
        self.dim = dim

    def forward(self, style_set: torch.Tensor) -> torch.Tensor:
        if style_set.ndim != 5 or style_set.shape[2] != 3:
            raise StedmError(
                f"style set must be (B, n, 3, H, W), got shape {tuple(style_set.shape)}"
            )
        b, n = style_set.shape[:2]
        x = style_set.flatten(0, 1)
        if self.backbone_name != "cnn":
            x = ((x + 1.0) / 2.0 - self.img_mean) / self.img_std
        return self.head(self.backbone(x)).view(b, n, self.dim)


class NoneAggregation(nn.Module):
    """The layout-only baseline: a zero style vector whatever the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.new_zeros(vectors.shape[0], self.dim)


class MeanAggregation(nn.Module):
    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.mean(dim=1)


class MaxAggregation(nn.Module):
    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.amax(dim=1)


class LinearAggregation(nn.Module):
    """The paper's MLP over the ordered concatenation of the n vectors (fixed n)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(n * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[1] != self.n:
            raise StedmError(
                f"aggregation 'linear' was built for n={self.n} style tiles, got {vectors.shape[1]}"
            )
        return self.mlp(vectors.flatten(1))


class AttentionAggregation(nn.Module):
    """Set-attention pooling: one learned query attends over the n vectors (any n, order-free)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise StedmError(f"attention aggregation: heads={heads} must divide dim={dim}")
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        kv = self.norm(vectors)
        pooled, _ = self.attn(
            self.query.expand(vectors.shape[0], -1, -1), kv, kv, need_weights=False
        )
        return self.out(pooled[:, 0])


def build_aggregation(name: str, dim: int, n: int, *, heads: int = 4) -> nn.Module:
    """Aggregation block `name` mapping (B, n, dim) -> (B, dim); `n` matters only for `linear`."""
    if name == "none":
        return NoneAggregation(dim)
    if name == "mean":
        return MeanAggregation()
    if name == "max":
        return MaxAggregation()
    if name == "linear":
        return LinearAggregation(dim, n)
    if name == "attention":
        return AttentionAggregation(dim, heads)
    raise StedmError(f"unknown style aggregation {name!r}; allowed: {list(AGGREGATIONS)}")
