"""Demo cohort textures: H&E-like stain concentrations painted into a layout, rendered per stain style.

Tumour: dense, large, pleomorphic hematoxylin nuclei in pale cytoplasm; stroma: wavy eosin fibres
with sparse small elongated nuclei. Concentrations become RGB through a slide's stain matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter

from stedm.config import DemoCohortConfig
from stedm.data.demo_layout import GRID, rasterize, smooth_noise


@dataclass(frozen=True)
class StainStyle:
    """How a slide's stain concentrations become RGB."""

    matrix: tuple[tuple[float, ...], ...]  # (3, 3) stain vectors H, E, residual
    h_scale: float
    e_scale: float
    background: tuple[float, float, float]  # glass intensity per channel (tint)
    blur: float  # Gaussian blur radius in pixels (scanner focus / section thickness)


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float field to (size, size) (PIL: fast, single pass)."""
    return np.array(Image.fromarray(field.astype(np.float32)).resize((size, size), Image.BILINEAR))


def _nucleus_bank(
    rng: np.random.Generator,
    angles: np.ndarray,
    major_px: tuple[float, float],
    ratio: tuple[float, float],
    irregular: float,
    nucleoli: bool,
) -> np.ndarray:
    """(n, P, P) nucleus stamps (hematoxylin density ~0–1.3): soft-edged, textured ellipses.

    `irregular` bends the outline with 2nd/3rd harmonics (pleomorphism); chromatin is clumpy
    noise with a darker nuclear membrane; tumour nuclei get a nucleolus.
    """
    half = int(np.ceil(major_px[1] * (1.3 + irregular)))
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    stamps = []
    for phi in angles:
        a = rng.uniform(*major_px)
        b = a * rng.uniform(*ratio)
        xr, yr = x * np.cos(phi) + y * np.sin(phi), -x * np.sin(phi) + y * np.cos(phi)
        theta = np.arctan2(yr, xr)
        wobble = 1 + irregular * (
            rng.normal() * np.cos(2 * theta + rng.uniform(0, 6.3))
            + rng.normal() * np.cos(3 * theta + rng.uniform(0, 6.3))
        )
        r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2) * wobble
        body = 1 / (1 + np.exp((r - 1) * 10))
        chromatin = gaussian_filter(rng.standard_normal(r.shape).astype(np.float32), 0.9)
        chromatin /= chromatin.std() + 1e-8
        stamp = body * (0.7 + 0.2 * chromatin) + 0.3 * np.exp(-(((r - 0.9) / 0.15) ** 2))
        if nucleoli:
            nx, ny = rng.uniform(-0.3, 0.3, size=2) * a
            stamp += 0.5 * np.exp(-((x - nx) ** 2 + (y - ny) ** 2) / (2 * (0.12 * a) ** 2))
        stamps.append(np.clip(stamp, 0, None))
    return np.stack(stamps).astype(np.float32)


def _place(
    size: int,
    bank: np.ndarray,
    which: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """Sum stamps `bank[which]` * weights centred at (ys, xs) into a (size, size) canvas.

    One `np.bincount` over all stamp pixels: vectorised, no Python loop over nuclei.
    """
    p = bank.shape[1]
    wide = size + p
    offsets = (np.arange(p)[:, None] * wide + np.arange(p)[None, :]).ravel()
    index = ((ys * wide + xs)[:, None] + offsets[None, :]).ravel()
    values = (bank.reshape(len(bank), -1)[which] * weights[:, None].astype(np.float32)).ravel()
    canvas = np.bincount(index, values, minlength=wide * wide).reshape(wide, wide)
    c = p // 2
    return canvas[c : c + size, c : c + size].astype(np.float32)


def _fibres(rng: np.random.Generator, size: int, um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Stroma eosin texture in [0, ~1.5] at (size, size), and the fibre angle per layout cell.

    Oriented band-pass noise (FFT filter: long along the fibre, a ~5–8 µm period across it) in
    three directions, blended by smooth weights so the fibre direction changes across the slide.
    """
    n = (size + 1) // 2  # half resolution: fibres are several pixels wide
    um = 2 * um_per_px
    f0 = um / rng.uniform(5.0, 8.0)  # cycles per pixel across the fibres
    f_along = um / rng.uniform(25.0, 40.0)  # fibre length ~ 1 / f_along
    theta0 = rng.uniform(0, np.pi)
    logits = np.stack([smooth_noise(rng, (GRID, GRID), GRID * 0.05) for _ in range(3)])
    weights = np.exp(3.0 * (logits - logits.max(0)))
    weights /= weights.sum(0)
    spectrum = scipy.fft.rfft2(rng.standard_normal((n, n)).astype(np.float32))
    fy = scipy.fft.fftfreq(n).astype(np.float32)[:, None]
    fx = scipy.fft.rfftfreq(n).astype(np.float32)[None, :]
    pattern = np.zeros((n, n), np.float32)
    for k in range(3):
        theta = theta0 + k * np.pi / 3  # fibre direction
        along = fx * np.cos(theta) + fy * np.sin(theta)
        across = np.abs(fy * np.cos(theta) - fx * np.sin(theta))
        band = np.exp(-0.5 * (along / f_along) ** 2 - 0.5 * ((across - f0) / (0.4 * f0)) ** 2)
        field = scipy.fft.irfft2(spectrum * band, s=(n, n), workers=1)
        field *= 1.0 / (field[::4, ::4].std() + 1e-8)  # a subsample is enough for the scale
        pattern += _upsample(weights[k], n) * np.clip(0.35 + 0.45 * field, 0, 1.5)
    return _upsample(pattern, size), theta0 + np.argmax(weights, axis=0) * np.pi / 3


def render_slide(
    layout: dict, style: StainStyle, cfg: DemoCohortConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Paint H&E textures into the rasterised layout and render them with `style`.

    Returns:
        (size, size, 3) uint8 RGB and a few statistics (class fractions, nucleus counts).
    """
    size, mpp = cfg.size_px, cfg.mpp
    tumour, stroma = rasterize(layout["Tumor"], size), rasterize(layout["Stroma"], size)

    mt, ms = tumour.astype(np.float32), stroma.astype(np.float32)  # the final blur anti-aliases
    fibres, fibre_angle = _fibres(rng, size, mpp)
    mottle = _upsample(smooth_noise(rng, (GRID, GRID), 1.5), size)

    # tumour: crowded, large, pleomorphic nuclei on a jittered grid (~10 µm spacing)
    step = 11.0 / mpp
    g = np.arange(step / 2, size, step)
    ys, xs = (
        a.ravel() + rng.uniform(-0.35, 0.35, a.size) * step
        for a in np.meshgrid(g, g, indexing="ij")
    )
    ys, xs = np.clip(ys, 0, size - 1).astype(np.int64), np.clip(xs, 0, size - 1).astype(np.int64)
    keep = tumour[ys, xs] & (rng.random(ys.size) > 0.15)
    ys, xs = ys[keep], xs[keep]
    bank = _nucleus_bank(
        rng, rng.uniform(0, np.pi, 48), (3.2 / mpp, 5.5 / mpp), (0.6, 1.0), 0.12, True
    )
    nuc_t = _place(
        size, bank, rng.integers(0, len(bank), ys.size), ys, xs, rng.uniform(1.0, 1.7, ys.size)
    )
    n_tumour_nuclei = int(ys.size)

    # stroma: sparse small elongated nuclei along the fibres, plus some round lymphocytes
    n = rng.poisson((size * mpp) ** 2 / 900.0)  # ~1 per 30x30 µm before masking
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    keep = stroma[ys, xs]
    ys, xs = ys[keep], xs[keep]
    bins = 16
    angles = np.repeat(np.arange(bins) * np.pi / bins, 3)
    spindle = _nucleus_bank(rng, angles, (3.5 / mpp, 6.0 / mpp), (0.2, 0.32), 0.05, False)
    lympho = _nucleus_bank(rng, np.zeros(8), (2.5 / mpp, 3.2 / mpp), (0.85, 1.0), 0.03, False)
    pad = (spindle.shape[1] - lympho.shape[1]) // 2
    bank = np.concatenate([spindle, np.pad(lympho, ((0, 0), (pad, pad), (pad, pad)))])
    cell = np.minimum((np.stack([ys, xs]) * GRID) // size, GRID - 1)
    ang = fibre_angle[cell[0], cell[1]] % np.pi
    which = (np.round(ang / np.pi * bins).astype(np.int64) % bins) * 3 + rng.integers(0, 3, ys.size)
    lymph = rng.random(ys.size) < 0.25
    which[lymph] = len(spindle) + rng.integers(0, len(lympho), int(lymph.sum()))
    nuc_s = _place(size, bank, which, ys, xs, rng.uniform(1.1, 1.6, ys.size))

    # stain concentrations (OD units), then Beer–Lambert with the slide's stain style
    # (in-place arithmetic: these are full-resolution float32 arrays)
    grain = rng.standard_normal((size, size), dtype=np.float32)
    nuc_t *= mt
    nuc_s *= ms
    tissue = mt + ms
    hema = mottle * 0.04
    hema += 0.16
    hema *= mt
    hema += nuc_t
    hema += nuc_s
    hema += 0.05 * ms
    hema += (0.004 + 0.03 * tissue) * grain
    eosin = mottle * 0.07
    eosin += 0.30
    eosin *= mt
    eosin *= 1 - 0.5 * np.minimum(nuc_t, 1)  # nuclei displace the cytoplasm
    fibres *= 0.85
    fibres += 0.16
    fibres *= ms
    eosin += fibres
    eosin += (0.004 + 0.04 * tissue) * grain[::-1]
    np.maximum(hema + 0.012, 0, out=hema)
    np.maximum(eosin + 0.012, 0, out=eosin)
    hema *= style.h_scale
    eosin *= style.e_scale
    tissue *= 0.03  # a little residual (third-stain) absorbance in tissue
    m = np.asarray(style.matrix, dtype=np.float32)
    rgb = np.empty((size, size, 3), np.uint8)
    for c in range(3):
        od = hema * -m[0, c]
        od -= eosin * m[1, c]
        od -= tissue * m[2, c]
        np.exp(od, out=od)
        od *= style.background[c]
        od += 0.5
        rgb[..., c] = np.clip(od, 0, 255, out=od)
    if style.blur > 0.05:  # one box blur of the same variance: 3x cheaper than PIL's Gaussian
        radius = (np.sqrt(12 * style.blur**2 + 1) - 1) / 2
        rgb = np.asarray(Image.fromarray(rgb).filter(ImageFilter.BoxBlur(float(radius))))
    stats = {
        "tumour_fraction": np.count_nonzero(tumour) / tumour.size,
        "stroma_fraction": np.count_nonzero(stroma) / stroma.size,
        "tumour_nuclei": n_tumour_nuclei,
        "stroma_nuclei": int(ys.size),
    }
    return rgb, stats
