"""FID and IS with the standard Inception-v3 network, from local weights only.

Both use torchmetrics (which wraps torch-fidelity's TF-ported Inception-v3, `inception-v3-compat`):
- FID: `FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=PATH)`, pool3
  features of the real reference set and the synthetic set, equal counts.
- IS: `InceptionScore(feature=NoTrainInceptionV3(name="inception-v3-compat",
  features_list=["logits_unbiased"], feature_extractor_weights_path=PATH))`, 10 splits.

Images go in as uint8 (lossless; no JPEG round trip); the metric resizes each tile to 299 x 299
(bilinear with antialiasing, the torchmetrics default). The weights file
`weights-inception-2015-12-05-6726825d.pth` comes from `report.inception_weights` or torch's hub
cache (`$TORCH_HOME/hub/checkpoints/`); when it is not there the result is a "not computed"
status naming the path. A randomly initialised Inception gives degenerate values (FID ~ 0, IS ~ 1),
so it is never used as a fallback; tests inject a small seeded network through `feature` /
`classifier` instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stedm.io import sha256_file

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_RESOLUTION = 299
RESIZE = "bilinear with antialiasing to 299 x 299 (torchmetrics default), from uint8"
IS_SPLITS = 10

# A source of uint8 (B, H, W, 3) batches; called once per pass over the images.
Batches = Callable[[], Iterable[np.ndarray]]


def inception_weights_path(configured: str | Path | None) -> tuple[Path | None, Path]:
    """(the weights file if present, the path that was looked at).

    A configured path may be the file or the folder holding it; without one, torch's hub cache
    (`torch.hub.get_dir()/checkpoints`, i.e. `$TORCH_HOME/hub/checkpoints`) is looked at.
    """
    if configured:
        path = Path(configured).expanduser()
        if path.is_dir():
            path = path / INCEPTION_FILE
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (path if path.is_file() else None), path


def not_computed(reason: str) -> dict[str, Any]:
    return {"status": "not computed", "reason": reason}


def missing_weights_reason(path: Path) -> str:
    return (f"no Inception weights at {path}; place {INCEPTION_FILE} there or set "
            "report.inception_weights")


def array_batches(images: Any, indices: Sequence[int], batch_size: int) -> Batches:
    """Batches of `images[i]` (a numpy or zarr (N, H, W, 3) uint8 array) for i in `indices`."""
    indices = [int(i) for i in indices]

    def gen() -> Iterable[np.ndarray]:
        for lo in range(0, len(indices), batch_size):
            yield np.stack([np.asarray(images[i]) for i in indices[lo : lo + batch_size]])

    return gen


def _to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    array = np.asarray(batch)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous().to(device)


@torch.no_grad()
def frechet_distance(real: Batches, fake: Batches, *, feature: torch.nn.Module | None = None,
                     weights: Path | None = None, device: str | torch.device = "cpu") -> float:
    """FID between two image sets; `feature` replaces the Inception pool3 features (tests).

    Args:
        real, fake: uint8 (B, H, W, 3) batch sources.
        feature: a module mapping uint8 (B, 3, H, W) to (B, d) features; None = Inception-v3.
        weights: the Inception weights file (required when `feature` is None).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is None:
        if weights is None:
            raise ValueError("frechet_distance needs Inception weights or an injected feature module")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    else:
        metric = FrechetInceptionDistance(feature=feature.eval())
    metric = metric.to(device)
    for name, source in (("real", real), ("synthetic", fake)):
        for batch in tqdm(source(), desc=f"FID features ({name})", unit="batch", mininterval=5.0):
            metric.update(_to_tensor(batch, device), real=name == "real")
    return float(metric.compute())


@torch.no_grad()
def inception_score(images: Batches, *, classifier: torch.nn.Module | None = None,
                    weights: Path | None = None, splits: int = IS_SPLITS,
                    device: str | torch.device = "cpu") -> tuple[float, float]:
    """(mean, std over splits) of the Inception Score; `classifier` maps uint8 images to logits.

    The split assignment is a random permutation in torchmetrics: seeded here, so reruns agree.
    """
    import warnings

    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    if classifier is None:
        if weights is None:
            raise ValueError("inception_score needs Inception weights or an injected classifier")
        classifier = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                        feature_extractor_weights_path=str(weights))
    batches = [_to_tensor(b, device) for b in images()]  # the split count needs the image count first
    n = sum(b.shape[0] for b in batches)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=classifier.eval(), splits=max(1, min(splits, n))).to(device)
    for batch in tqdm(batches, desc="IS logits", unit="batch", mininterval=5.0):
        metric.update(batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = metric.compute()
    return float(mean), float(std)


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else float(value)


def generation_quality(real: Batches, fake: Batches, *, n_images: int, tile_size: int,
                       weights: str | Path | None = None, feature: torch.nn.Module | None = None,
                       classifier: torch.nn.Module | None = None,
                       device: str | torch.device | None = None) -> dict[str, Any]:
    """FID (real vs synthetic) and IS (synthetic, and the real set as a reference) as a result dict.

    Args:
        real, fake: batch sources of `n_images` images each (equal counts).
        weights: configured Inception weights path (None = torch hub cache).
        feature, classifier: injected networks (tests); with both, no weights are needed.

    Returns:
        `{"status": "computed", "fid", "is_mean", "is_std", "is_real_mean", ...}` or
        `{"status": "not computed", "reason": ...}` — never a number from a network that is not
        the standard one (unless injected on purpose).
    """
    found, looked_at = inception_weights_path(weights)
    if found is None and (feature is None or classifier is None):
        return not_computed(missing_weights_reason(looked_at))
    if n_images < 2:
        return not_computed(f"FID needs at least 2 images per set, got {n_images}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    fid = frechet_distance(real, fake, feature=feature, weights=found, device=device)
    if classifier is None:  # one Inception for both IS passes (loading the weights takes seconds)
        from torchmetrics.image.fid import NoTrainInceptionV3

        classifier = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                        feature_extractor_weights_path=str(found))
    is_mean, is_std = inception_score(fake, classifier=classifier, weights=found, device=device)
    is_real_mean, is_real_std = inception_score(real, classifier=classifier, weights=found, device=device)
    seconds = time.perf_counter() - start
    network = ("injected test network" if feature is not None
               else "inception-v3-compat (torch-fidelity port of the TF FID network)")
    log.info("FID %.3f, IS %.3f ± %.3f (real %.3f) on %d images per set in %.0f s",
             fid, is_mean, is_std, is_real_mean, n_images, seconds)
    return {
        "status": "computed",
        "fid": _finite(fid),
        "is_mean": _finite(is_mean),
        "is_std": _finite(is_std),
        "is_real_mean": _finite(is_real_mean),
        "is_real_std": _finite(is_real_std),
        "is_splits": max(1, min(IS_SPLITS, n_images)),
        "n_images": int(n_images),
        "tile_size": int(tile_size),
        "resolution": INCEPTION_RESOLUTION,
        "resize": RESIZE,
        "network": network,
        "fid_feature": "pool3 (2048)" if feature is None else "injected",
        "weights": str(found) if found is not None else None,
        "weights_sha256": sha256_file(found) if found is not None and found.is_file() else None,
        "seconds": seconds,
    }
