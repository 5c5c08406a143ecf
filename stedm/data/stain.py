"""Stain maths for H&E: colour deconvolution (Beer–Lambert) and HED colour augmentation.

Bright-field light passing through stained tissue is absorbed per stain (Beer–Lambert):
`I = I0 * exp(-OD)` with optical density `OD = sum_s c_s * v_s`, where `v_s` is the stain's unit
absorption vector over (R, G, B) and `c_s` its concentration. A *stain matrix* stacks the
vectors as rows (hematoxylin, eosin, residual/DAB), so `OD = C @ M` and `C = OD @ inv(M)`
(Ruifrok & Johnston colour deconvolution). Concentrations here are in natural-log optical-density
units per unit stain vector: glass ≈ 0, a stroma fibre ≈ 0.8 (eosin), a dark nucleus ≈ 1.5–2
(hematoxylin). (scikit-image's `rgb2hed` reports the same quantity divided by ln(10⁶) ≈ 13.8.)

Used by the demo cohort (render per-patient stainings) and by the segmentation baseline's stain
augmentation (`hed_jitter`, after Tellez et al. 2018).
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston H&E-DAB vectors, the ones scikit-image ships as `skimage.color.rgb_from_hed`.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Typical slide-scanner glass white; an OD of 0 maps to this.
DEFAULT_BACKGROUND = (255.0, 255.0, 255.0)
_MIN_INTENSITY = 1.0  # avoids log(0) for fully black pixels


def stain_matrix(
    hematoxylin: np.ndarray, eosin: np.ndarray, residual: np.ndarray | None = None
) -> np.ndarray:
    """A (3, 3) stain matrix with unit-length rows (H, E, residual).

    Args:
        hematoxylin: absorption vector over (R, G, B); any positive length.
        eosin: absorption vector over (R, G, B).
        residual: third vector; None = the normalised cross product of H and E (orthogonal, so
            the deconvolution stays well conditioned for two-stain slides).
    """
    h = np.asarray(hematoxylin, dtype=np.float64)
    e = np.asarray(eosin, dtype=np.float64)
    r = np.cross(h, e) if residual is None else np.asarray(residual, dtype=np.float64)
    r = np.abs(r)  # absorption is non-negative
    m = np.stack([h, e, r])
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def perturb_stain_matrix(matrix: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Jitter each stain vector by Gaussian noise (relative to unit length) and renormalise.

    Models a lab's dye batch / protocol shifting the hue of H and E. Components are kept
    positive so every stain still absorbs in every channel.
    """
    noisy = np.asarray(matrix, dtype=np.float64) + rng.normal(0.0, sigma, size=(3, 3))
    noisy = np.clip(noisy, 0.01, None)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def rgb_to_od(rgb: np.ndarray, background: np.ndarray | tuple = DEFAULT_BACKGROUND) -> np.ndarray:
    """Optical density `-ln(I / I0)` per channel (float32, >= 0), for uint8 or float 0–255 input."""
    i0 = np.asarray(background, dtype=np.float32)
    rgb = np.maximum(np.asarray(rgb, dtype=np.float32), _MIN_INTENSITY)
    return np.maximum(-np.log(rgb / i0), 0.0)


def od_to_rgb(od: np.ndarray, background: np.ndarray | tuple = DEFAULT_BACKGROUND) -> np.ndarray:
    """Inverse of `rgb_to_od`: uint8 RGB `I0 * exp(-OD)`, rounded and clipped to 0–255."""
    i0 = np.asarray(background, dtype=np.float32)
    rgb = np.exp(-np.asarray(od, dtype=np.float32)) * i0
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def rgb_to_concentrations(
    rgb: np.ndarray,
    matrix: np.ndarray = RGB_FROM_HED,
    background: np.ndarray | tuple = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """Colour deconvolution: (..., 3) RGB -> (..., 3) stain concentrations (H, E, residual).

    Concentrations may come out slightly negative where a pixel's colour lies outside the cone
    spanned by the stain vectors; they are returned unclipped so `concentrations_to_rgb` inverts
    this exactly (up to 8-bit rounding).
    """
    od = rgb_to_od(rgb, background)
    return od @ np.linalg.inv(matrix).astype(np.float32)


def concentrations_to_rgb(
    conc: np.ndarray,
    matrix: np.ndarray = RGB_FROM_HED,
    background: np.ndarray | tuple = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """Render (..., k) stain concentrations with the first k rows of a stain matrix to uint8 RGB.

    Args:
        conc: concentrations, last axis = stains (k = 2 for H&E only, 3 with the residual).
        matrix: (>= k, 3) stain matrix (rows = stains).
        background: glass intensity I0 per channel (a tint: e.g. (246, 242, 250)).
    """
    conc = np.asarray(conc, dtype=np.float32)
    m = np.asarray(matrix, dtype=np.float32)[: conc.shape[-1]]
    return od_to_rgb(conc @ m, background)


def hed_jitter(
    rgb: np.ndarray,
    rng: np.random.Generator,
    sigma_scale: float = 0.2,
    sigma_shift: float = 0.05,
    matrix: np.ndarray = RGB_FROM_HED,
) -> np.ndarray:
    """HED stain augmentation: rescale and shift each stain's concentration, re-render.

    For each stain s, `c_s' = c_s * a_s + b_s` with `a_s ~ U(1 - sigma_scale, 1 + sigma_scale)` and
    `b_s ~ U(-sigma_shift, sigma_shift)` (OD units), one draw per image (Tellez et al. 2018,
    "HED" augmentation; their "light"/"strong" settings correspond to sigma_scale 0.05 / 0.2).

    Args:
        rgb: (H, W, 3) or (N, H, W, 3) uint8 image(s); with a batch, each image gets its own draw.
        rng: the random generator (the caller owns seeding).
        sigma_scale: half-width of the multiplicative jitter.
        sigma_shift: half-width of the additive jitter in OD units.
        matrix: stain matrix used for the deconvolution.

    Returns:
        uint8 array of the same shape.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim == 4:
        return np.stack([hed_jitter(im, rng, sigma_scale, sigma_shift, matrix) for im in rgb])
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"hed_jitter expects (H, W, 3) or (N, H, W, 3) RGB, got shape {rgb.shape}")
    conc = rgb_to_concentrations(rgb, matrix)
    scale = rng.uniform(1.0 - sigma_scale, 1.0 + sigma_scale, size=3).astype(np.float32)
    shift = rng.uniform(-sigma_shift, sigma_shift, size=3).astype(np.float32)
    return concentrations_to_rgb(conc * scale + shift, matrix)
