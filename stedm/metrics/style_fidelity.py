"""Style fidelity: does a synthetic image carry the stain style of the slide it was conditioned on?

Each image is described by stain statistics of its tissue pixels (no learned weights involved):
per-channel mean, standard deviation and 10/50/90th percentiles of the HED concentrations
(`stedm.data.stain`, Ruifrok & Johnston vectors), and the mean and standard deviation of CIE Lab.
Tissue = pixels whose summed optical density exceeds `TISSUE_OD` (glass is near 0); an image with
almost no tissue is described by all its pixels. Each candidate style slide is described by the
mean descriptor of a sample of its real tiles.

A synthetic image is assigned to the nearest slide in standardised Euclidean distance (each
statistic divided by its standard deviation over all sampled real tiles, so OD units and Lab units
weigh alike). Reported: top-1 accuracy of "nearest slide = its style slide" against chance
(1 / number of candidate slides), the mean distance to its own slide against the mean distance to
the other slides, and, as the ceiling of the descriptor, the same top-1 for held-out real tiles of
the candidate slides (tiles not used in the slide descriptors).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from skimage.color import rgb2lab

from stedm.data.stain import rgb_to_concentrations, rgb_to_od

log = logging.getLogger(__name__)

TISSUE_OD = 0.25  # summed OD over R, G, B; glass with a scanner tint stays near 0.1
MIN_TISSUE_FRACTION = 0.01
PERCENTILES = (10, 50, 90)
FEATURE_NAMES = (
    [f"{c}_{s}" for c in ("H", "E", "R") for s in ("mean", "std", *(f"p{p}" for p in PERCENTILES))]
    + [f"{c}_{s}" for c in ("L", "a", "b") for s in ("mean", "std")]
)
DESCRIPTOR = ("per tissue pixel (summed OD > 0.25): HED concentrations mean/std/p10/p50/p90, "
              "CIE Lab mean/std; standardised Euclidean distance")


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """(K, 3) uint8 tissue pixels of an (H, W, 3) image (all pixels when there is almost no tissue)."""
    pixels = np.asarray(rgb).reshape(-1, 3)
    tissue = rgb_to_od(pixels).sum(axis=-1) > TISSUE_OD
    if tissue.sum() < max(16, MIN_TISSUE_FRACTION * len(pixels)):
        return pixels
    return pixels[tissue]


def image_descriptor(rgb: np.ndarray) -> np.ndarray:
    """The stain-statistics vector (`FEATURE_NAMES`) of one uint8 RGB image."""
    pixels = tissue_pixels(rgb)
    hed = rgb_to_concentrations(pixels)
    lab = rgb2lab(pixels[None].astype(np.float32) / 255.0)[0]
    parts = [hed.mean(0), hed.std(0), *np.percentile(hed, PERCENTILES, axis=0)]
    hed_stats = np.stack(parts, axis=1).reshape(-1)  # channel-major, as FEATURE_NAMES
    lab_stats = np.stack([lab.mean(0), lab.std(0)], axis=1).reshape(-1)
    return np.concatenate([hed_stats, lab_stats]).astype(np.float64)


def describe(images: Iterable[np.ndarray]) -> np.ndarray:
    """(N, F) descriptors of an iterable of uint8 (H, W, 3) images."""
    rows = [image_descriptor(im) for im in images]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))


def nearest_slides(descriptors: np.ndarray, centres: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, S) standardised Euclidean distances from each descriptor to each slide centre."""
    diff = (descriptors[:, None, :] - centres[None, :, :]) / scale
    return np.sqrt((diff**2).sum(-1))


def style_fidelity(
    fake_images: Any,
    fake_slides: Sequence[str],
    real_images: Mapping[str, Any],
    *,
    max_images: int = 1000,
    tiles_per_slide: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Nearest-style-slide evaluation of a synthetic set.

    Args:
        fake_images: (N, H, W, 3) uint8 array (numpy or zarr) of synthetic images.
        fake_slides: the style slide of each synthetic image ("" = no style).
        real_images: candidate slide id -> its (M, H, W, 3) uint8 tile array.
        max_images: synthetic images evaluated (an evenly spaced subset beyond that).
        tiles_per_slide: real tiles per slide in its descriptor; as many again are held out to
            measure the descriptor's ceiling on real tiles (half of each when the slide has fewer
            than twice that many).

    Returns:
        A result dict with `status` "computed" (top1, chance, distances, per-slide results,
        confusion) or "not computed" with a `reason`.
    """
    slides = sorted(real_images)
    styled = [i for i, s in enumerate(fake_slides) if s]
    if not styled:
        return {"status": "not computed",
                "reason": "the synthetic images have no style slide (style sampling 'none')"}
    unknown = sorted({fake_slides[i] for i in styled} - set(slides))
    if unknown:
        return {"status": "not computed", "reason": f"no tile stores for style slides {unknown[:5]}"}
    if len(slides) < 2:
        return {"status": "not computed",
                "reason": f"only {len(slides)} candidate style slide: nearest-slide accuracy is trivial"}
    rng = np.random.default_rng(seed)
    centres, pooled, held = [], [], {}
    for slide in slides:
        array = real_images[slide]
        m = int(array.shape[0])
        order = rng.permutation(m)
        n_held = min(tiles_per_slide, m // 2)  # small slides: half describe the slide, half test it
        n_ref = min(tiles_per_slide, m - n_held)
        ref = np.sort(order[:n_ref])
        desc = describe(np.asarray(array[int(i)]) for i in ref)
        centres.append(desc.mean(0))
        pooled.append(desc)
        rest = np.sort(order[n_ref : n_ref + n_held])
        held[slide] = describe(np.asarray(array[int(i)]) for i in rest)
    centres_arr = np.stack(centres)
    scale = np.concatenate(pooled).std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    picks = [styled[int(j)] for j in np.unique(np.linspace(0, len(styled) - 1, min(max_images, len(styled)))
                                               .round().astype(int))]
    fake_desc = describe(np.asarray(fake_images[i]) for i in picks)
    own = np.asarray([slides.index(fake_slides[i]) for i in picks])
    dist = nearest_slides(fake_desc, centres_arr, scale)
    nearest = dist.argmin(1)
    own_dist = dist[np.arange(len(picks)), own]
    others = (dist.sum(1) - own_dist) / (len(slides) - 1)
    confusion = np.zeros((len(slides), len(slides)), dtype=int)
    np.add.at(confusion, (own, nearest), 1)
    per_slide = {
        s: {"n": int((own == k).sum()),
            "top1": float((nearest[own == k] == k).mean()) if (own == k).any() else None}
        for k, s in enumerate(slides)
    }
    real_desc = [(k, held[s]) for k, s in enumerate(slides) if len(held[s])]
    real_top1 = None
    if real_desc:
        hits = [nearest_slides(d, centres_arr, scale).argmin(1) == k for k, d in real_desc]
        real_top1 = float(np.concatenate(hits).mean())
    result = {
        "status": "computed",
        "top1": float((nearest == own).mean()),
        "chance": 1.0 / len(slides),
        "n_images": len(picks),
        "n_slides": len(slides),
        "slides": slides,
        "mean_own_distance": float(own_dist.mean()),
        "mean_other_distance": float(others.mean()),
        "own_closer_fraction": float((own_dist < others).mean()),
        "real_tiles_top1": real_top1,
        "tiles_per_slide": int(tiles_per_slide),
        "per_slide": per_slide,
        "confusion": confusion.tolist(),
        "descriptor": DESCRIPTOR,
    }
    log.info("style fidelity: top-1 %.3f (chance %.3f, real tiles %s) over %d images / %d slides; "
             "distance own %.2f vs other %.2f", result["top1"], result["chance"], real_top1, len(picks),
             len(slides), result["mean_own_distance"], result["mean_other_distance"])
    return result
