"""Tissue detection on a low-resolution thumbnail.

Glass is bright and colourless; stained tissue is darker and, above all, coloured. The feature is
the mean of HSV saturation and darkness (1 - grey), both in [0, 1], so pale but stained tissue
(fat, loose stroma) still stands out from glass, and a fixed threshold means the same on every
slide. Near-black, colourless pixels (scanner background outside the scan area, some pen marks)
are not tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

# Otsu on an image that is almost constant (an empty slide) splits noise; below this range of
# feature values we fall back to MIN_THRESHOLD alone.
MIN_CONTRAST = 0.04
# Glass (with JPEG noise and a slightly tinted background) stays below this feature value; Otsu
# is never allowed to go lower, so a slide with little tissue does not turn its glass to tissue.
MIN_THRESHOLD = 0.06


def tissue_feature(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel tissue evidence in [0, 1]: mean of HSV saturation and darkness."""
    x = rgb.astype(np.float32) / 255.0
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
    grey = x @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    feature = 0.5 * saturation + 0.5 * (1.0 - grey)
    feature[(grey < 0.1) & (saturation < 0.15)] = 0.0  # black, colourless: not tissue
    return feature


def tissue_threshold(feature: np.ndarray, threshold: str | float = "otsu") -> float:
    """The feature threshold: a fixed value in [0, 1] or Otsu's (never below MIN_THRESHOLD)."""
    if threshold != "otsu":
        value = float(threshold)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"tissue threshold must be 'otsu' or in [0, 1], got {threshold!r}")
        return value
    if feature.size == 0 or float(feature.max() - feature.min()) < MIN_CONTRAST:
        return MIN_THRESHOLD
    return max(float(threshold_otsu(feature)), MIN_THRESHOLD)


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    threshold: str | float = "otsu",
    *,
    min_object_px: int = 16,
    max_hole_px: int = 16,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Args:
        thumbnail_rgb: (h, w, 3) uint8.
        threshold: 'otsu' or a fixed feature threshold in [0, 1] (see `tissue_feature`).
        min_object_px: tissue components of at most this many pixels are dropped (dust).
        max_hole_px: holes of at most this many pixels are filled (nuclei-free gaps, vessels).

    Returns:
        (h, w) bool; all False for a blank slide.
    """
    feature = ndimage.gaussian_filter(tissue_feature(thumbnail_rgb), sigma=1.0, mode="nearest")
    mask = feature > tissue_threshold(feature, threshold)
    if not mask.any():
        return mask
    mask = remove_small_objects(mask, max_size=min_object_px)
    return remove_small_holes(mask, max_size=max_hole_px)
