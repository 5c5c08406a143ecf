"""`stedm make-demo-cohort`: a synthetic multi-centre H&E cohort, so the workflow runs offline.

What it writes under `--out-dir`:
- `slides/<slide_id>.tiff`: pyramidal generic TIFFs (JPEG tiles, 3 levels, µm/px in the tags);
- `annotations/<slide_id>.geojson`: QuPath-style GeoJSON, one Tumor and one Stroma feature per
  slide, (Multi)Polygons with holes in level-0 pixel coordinates; glass is unannotated;
- `manifest.csv`: one row per slide (`group` = staining centre), written last.

How a slide is made: a layout (tissue blob(s), tumour regions inside them) is drawn from smooth
random fields and turned into polygons; the polygons — not the fields — are rasterised (with the
label tiles' convention) and the textures painted into them, so image and annotation agree pixel
for pixel. Textures are stain *concentrations* (tumour: dense, large, pleomorphic hematoxylin
nuclei in pale cytoplasm; stroma: wavy eosin fibres with sparse small elongated nuclei), rendered
to RGB with a patient-specific stain style: centre style (clearly different per centre) + patient
jitter + small slide jitter (two sections of one patient look alike). All follows from the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import string
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import shapely
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter
from shapely.geometry import MultiPolygon, Polygon, mapping
from skimage.measure import find_contours
from tqdm import tqdm

from stedm.config import Config, DemoCohortConfig, load_config
from stedm.data.manifest import SlideRecord, write_manifest
from stedm.data.stain import RGB_FROM_HED, perturb_stain_matrix
from stedm.data.tiff import write_pyramidal_tiff
from stedm.errors import StedmError
from stedm.io import atomic_output

log = logging.getLogger(__name__)

GRID = 256  # layout resolution (cells per side): fields are smooth, so 256 is plenty
PRECISION = 0.01  # polygon coordinates are snapped to 1/100 px (short, exact GeoJSON)
CLASS_COLORS = {"Tumor": [200, 0, 0], "Stroma": [150, 200, 150]}  # QuPath's default colours
# Stain-style spread: centres sit on a circle in (log H scale, log E scale) so that every centre is
# clearly different; patients and sections add progressively smaller jitter around their centre.
CENTRE_RADIUS, PATIENT_SIGMA, SECTION_SIGMA = 0.45, 0.06, 0.02


@dataclass(frozen=True)
class DemoSlide:
    """One planned slide; cheap to compute, enough to render it deterministically."""

    slide_id: str
    patient_id: str
    group: str  # staining centre, e.g. "centre_A"
    split: str  # "test" for the two-slide patients, else "" (assigned later by `stedm split`)
    seed: int  # slide seed: layout, textures, section jitter
    patient_seed: int  # patient stain style (shared by a patient's sections)
    centre: int  # centre index
    section: int  # 0, or 1 for a patient's second slide


@dataclass(frozen=True)
class StainStyle:
    """How a slide's stain concentrations become RGB."""

    matrix: tuple[tuple[float, ...], ...]  # (3, 3) stain vectors H, E, residual
    h_scale: float
    e_scale: float
    background: tuple[float, float, float]  # glass intensity per channel (tint)
    blur: float  # Gaussian blur radius in pixels (scanner focus / section thickness)


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


def plan_demo_cohort(cfg: DemoCohortConfig) -> list[DemoSlide]:
    """Slides, patients, centres and fixed test patients of the demo cohort (no images)."""
    k = cfg.n_two_slide_patients
    if 2 * k > cfg.n_slides:
        raise StedmError(
            f"config key 'cohort.demo.n_two_slide_patients': {k} two-slide patients need "
            f"{2 * k} slides but cohort.demo.n_slides is {cfg.n_slides}"
        )
    n_patients = cfg.n_slides - k
    rng = np.random.default_rng(_seed(cfg.seed, 0))
    centres = rng.permutation(np.arange(n_patients) % cfg.n_centres)
    # two-slide patients cycle through the centres, so the fixed test set spans several centres
    by_centre = [list(rng.permutation(np.flatnonzero(centres == c))) for c in range(cfg.n_centres)]
    two_slide: set[int] = set()
    c = 0
    while len(two_slide) < k:
        if by_centre[c % cfg.n_centres]:
            two_slide.add(int(by_centre[c % cfg.n_centres].pop()))
        c += 1
    width = max(3, len(str(cfg.n_slides)))
    slides: list[DemoSlide] = []
    for p in range(n_patients):
        for section in range(2 if p in two_slide else 1):
            i = len(slides)
            slides.append(
                DemoSlide(
                    slide_id=f"demo_{i + 1:0{width}d}",
                    patient_id=f"P{p + 1:0{width}d}",
                    group=_centre_name(int(centres[p]), cfg.n_centres),
                    split="test" if p in two_slide else "",
                    seed=_seed(cfg.seed, 1, i),
                    patient_seed=_seed(cfg.seed, 2, p),
                    centre=int(centres[p]),
                    section=section,
                )
            )
    return slides


def demo_slide_ids(cfg: DemoCohortConfig) -> list[str]:
    """Slide ids of the demo cohort, without generating anything (for the Snakefile)."""
    return [s.slide_id for s in plan_demo_cohort(cfg)]


def _centre_name(c: int, n: int) -> str:
    return f"centre_{string.ascii_uppercase[c]}" if n <= 26 else f"centre_{c + 1:02d}"


# --------------------------------------------------------------------------- stain style


def _jitter(style: StainStyle, rng: np.random.Generator, sigma: float) -> StainStyle:
    return StainStyle(
        matrix=tuple(map(tuple, perturb_stain_matrix(np.array(style.matrix), rng, sigma / 3))),
        h_scale=style.h_scale * float(np.exp(rng.normal(0, sigma))),
        e_scale=style.e_scale * float(np.exp(rng.normal(0, sigma))),
        background=tuple(
            float(np.clip(b + rng.normal(0, 40 * sigma), 200, 255)) for b in style.background
        ),
        blur=float(max(0.0, style.blur + rng.normal(0, 2 * sigma))),
    )


def stain_style(slide: DemoSlide, cfg: DemoCohortConfig) -> StainStyle:
    """The slide's stain style: centre style, then patient jitter, then section jitter."""
    offset = np.random.default_rng(_seed(cfg.seed, 3)).uniform(0, 2 * np.pi)
    rng = np.random.default_rng(_seed(cfg.seed, 4, slide.centre))
    angle = offset + 2 * np.pi * slide.centre / cfg.n_centres + rng.uniform(-0.25, 0.25)
    centre = StainStyle(
        matrix=tuple(map(tuple, perturb_stain_matrix(RGB_FROM_HED, rng, 0.07))),
        h_scale=float(np.exp(CENTRE_RADIUS * np.cos(angle))),
        e_scale=float(np.exp(CENTRE_RADIUS * np.sin(angle))),
        background=tuple(float(v) for v in 252 - rng.uniform(0, 12, size=3)),
        blur=float(rng.uniform(0.3, 1.3)),
    )
    patient = _jitter(centre, np.random.default_rng(slide.patient_seed), PATIENT_SIGMA)
    return _jitter(patient, np.random.default_rng(_seed(slide.seed, 5)), SECTION_SIGMA)


# --------------------------------------------------------------------------- layout → polygons


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _polygons(geom) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for part in getattr(geom, "geoms", []) for g in _polygons(part)]


def _as_geometry(polys: list[Polygon]) -> Polygon | MultiPolygon:
    if not polys:
        return Polygon()
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _field_to_geometry(field: np.ndarray, level: float, scale: float) -> Polygon | MultiPolygon:
    """Region `field > level` as polygons in level-0 pixels (cell i covers [i*scale, (i+1)*scale)).

    Contouring the continuous field (not a binary mask) gives smooth, sub-cell boundaries. The
    field is padded with low values so every contour closes; nested rings combine by even-odd
    (symmetric difference), which yields exteriors and holes without tracking the nesting.
    """
    padded = np.pad(field, 1, constant_values=float(field.min()) - 1.0)
    region = Polygon()
    for contour in find_contours(padded, level):
        if len(contour) >= 4:
            xy = (contour[:, ::-1] - 1 + 0.5) * scale  # (row, col) -> (x, y), undo pad, centres
            region = region.symmetric_difference(shapely.make_valid(Polygon(xy)))
    return shapely.make_valid(region)


def _drop_small(geom, min_area: float, min_hole: float | None = None) -> Polygon | MultiPolygon:
    keep = []
    for p in _polygons(geom):
        if p.area < min_area:
            continue
        if min_hole is not None:
            p = Polygon(p.exterior, [h for h in p.interiors if Polygon(h).area >= min_hole])
        keep.append(p)
    return _as_geometry(keep)


def make_layout(rng: np.random.Generator, size: int) -> dict[str, Polygon | MultiPolygon]:
    """Tissue (Stroma) and Tumor geometries for one slide, in level-0 pixels."""
    scale, area = size / GRID, float(size) ** 2
    yy, xx = np.mgrid[0:GRID, 0:GRID].astype(np.float32) / GRID
    # tissue: 1–3 overlapping elliptical blobs, lobulated by smooth noise, never cut by the edge
    prior = np.zeros((GRID, GRID), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.32, 0.68, size=2)
        ry, rx = rng.uniform(0.16, 0.3, size=2)
        phi = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
        v = (yy - cy) * np.cos(phi) - (xx - cx) * np.sin(phi)
        prior += np.exp(-0.5 * ((u / rx) ** 2 + (v / ry) ** 2))
    edge = np.clip(np.minimum.reduce([xx, yy, 1 - xx, 1 - yy]) / 0.15, 0, 1)
    tissue_field = prior / prior.max() + 0.2 * _smooth_noise(rng, (GRID, GRID), GRID * 0.04)
    tissue_field -= 2.0 * (1 - edge) ** 2  # a soft push: outlines stay round near the edge
    level = np.quantile(tissue_field, 1 - rng.uniform(0.5, 0.62))  # glass: ~38–50 %
    tissue = _field_to_geometry(tissue_field, float(level), scale)
    tissue = _drop_small(tissue, 0.01 * area, 0.002 * area)
    # tumour: several components inside the tissue, irregular borders, sometimes with holes
    tumour = Polygon()
    for _ in range(10):  # a draw with no tumour left after clipping is rare; then redraw
        field = _smooth_noise(rng, (GRID, GRID), GRID * 0.045)
        field += 0.35 * _smooth_noise(rng, (GRID, GRID), GRID * 0.015)
        inner = tissue.buffer(-rng.uniform(0.0, 0.02) * size)
        inside = shapely.contains_xy(
            inner, (xx.ravel() + 0.5 / GRID) * size, (yy.ravel() + 0.5 / GRID) * size
        )
        if inside.sum() < 10:
            inner, inside = tissue, np.ones(GRID * GRID, bool)
        level = np.quantile(field.ravel()[inside], 1 - rng.uniform(0.3, 0.5))
        tumour = _field_to_geometry(field, float(level), scale).intersection(inner)
        tumour = _drop_small(tumour, 0.002 * area, 0.0005 * area)
        if not tumour.is_empty:
            break
    # simplify a little, snap to a 0.01 px grid, and derive Stroma = tissue - Tumor *afterwards*
    # on that grid, so the two classes share their borders exactly and never overlap
    tissue, tumour = (
        shapely.set_precision(g.simplify(1.0, preserve_topology=True), PRECISION)
        for g in (tissue, tumour)
    )
    tumour = shapely.intersection(tumour, tissue, grid_size=PRECISION)
    stroma = shapely.difference(tissue, tumour, grid_size=PRECISION)
    return {
        "Tumor": _as_geometry(_polygons(tumour)),
        "Stroma": _drop_small(stroma, 0.0005 * area),  # slivers are left unannotated
    }


def rasterize(geom, size: int) -> np.ndarray:
    """Boolean (size, size) mask of pixels whose centre lies inside `geom` (level-0 pixels).

    Even-odd scanline, vectorised: each ring edge toggles the pixels right of where it crosses a
    row of pixel centres, so holes and islands in holes need no special case. Same convention as
    the label rasteriser in `stedm.data.annotations` (a centre on a left edge is inside, on a
    right edge outside), so painted classes and label tiles agree pixel for pixel.
    """
    rings = [r for p in _polygons(geom) for r in (p.exterior, *p.interiors)]
    if not rings:
        return np.zeros((size, size), bool)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    xy = coords - 0.5  # pixel (col, row) is centred on (col + 0.5, row + 0.5)
    same = ring_of[:-1] == ring_of[1:]
    (ax, ay), (bx, by) = xy[:-1][same].T, xy[1:][same].T
    lo = np.clip(np.ceil(np.minimum(ay, by)), 0, size).astype(np.int64)
    n_rows = np.clip(np.ceil(np.maximum(ay, by)), 0, size).astype(np.int64) - lo
    edge = np.repeat(np.arange(n_rows.size), n_rows)
    row = lo[edge] + np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    ax, ay, bx, by = ax[edge], ay[edge], bx[edge], by[edge]
    col = np.clip(np.ceil(ax + (row - ay) * (bx - ax) / (by - ay)), 0, size).astype(np.int64)
    toggles = np.bincount(row * (size + 1) + col, minlength=size * (size + 1))
    parity = np.cumsum(toggles.reshape(size, size + 1), axis=1, dtype=np.int32)[:, :size]
    return (parity & 1).astype(bool)


def feature_collection(layout: dict, rng: np.random.Generator) -> dict:
    """QuPath-style GeoJSON FeatureCollection of the layout's annotations."""
    features = []
    for name, geom in layout.items():
        if geom.is_empty:
            continue
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "geometry": mapping(geom),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": CLASS_COLORS[name]},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


# --------------------------------------------------------------------------- textures


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
    logits = np.stack([_smooth_noise(rng, (GRID, GRID), GRID * 0.05) for _ in range(3)])
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
    mottle = _upsample(_smooth_noise(rng, (GRID, GRID), 1.5), size)

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


def generate_demo_slide(slide: DemoSlide, cfg: DemoCohortConfig) -> tuple[np.ndarray, dict, dict]:
    """Render one planned slide: (level-0 RGB, GeoJSON FeatureCollection, statistics)."""
    rng = np.random.default_rng(slide.seed)
    layout = make_layout(rng, cfg.size_px)
    geojson = feature_collection(layout, np.random.default_rng(_seed(slide.seed, 6)))
    rgb, stats = render_slide(layout, stain_style(slide, cfg), cfg, rng)
    return rgb, geojson, stats


# --------------------------------------------------------------------------- cohort + CLI


def _write_slide(job: tuple[DemoSlide, DemoCohortConfig, Path]) -> dict:
    slide, cfg, out_dir = job
    rgb, geojson, stats = generate_demo_slide(slide, cfg)
    write_pyramidal_tiff(out_dir / "slides" / f"{slide.slide_id}.tiff", rgb, cfg.mpp, n_levels=3)
    with atomic_output(out_dir / "annotations" / f"{slide.slide_id}.geojson") as tmp:
        tmp.write_text(json.dumps(geojson) + "\n")
    return stats


def make_demo_cohort(config: Config, out_dir: Path, workers: int = 1) -> Path:
    """Write the demo cohort's slides, annotations and (last) manifest; return the manifest path."""
    cfg, out_dir = config.cohort.demo, Path(out_dir)
    for name in CLASS_COLORS:
        if config.labels.class_index(name) is None:
            log.warning(
                "demo annotation class '%s' is not in labels.classes %s (nor an alias)",
                name,
                list(config.labels.classes),
            )
    slides = plan_demo_cohort(cfg)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    jobs = [(s, cfg, out_dir) for s in slides]
    start = time.perf_counter()
    progress = dict(total=len(jobs), desc="demo slides", unit="slide")
    if workers > 1:
        # fork on Linux: workers inherit the imported modules instead of re-importing them
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
            stats = list(tqdm(pool.imap(_write_slide, jobs), **progress))
    else:
        stats = [_write_slide(job) for job in tqdm(jobs, **progress)]
    records = [
        SlideRecord(
            slide_id=s.slide_id,
            patient_id=s.patient_id,
            slide_path=out_dir / "slides" / f"{s.slide_id}.tiff",
            annotation_path=out_dir / "annotations" / f"{s.slide_id}.geojson",
            group=s.group,
            split=s.split,
        )
        for s in slides
    ]
    manifest = out_dir / "manifest.csv"
    write_manifest(manifest, records)
    log.info(
        "wrote %d slides (%d patients, %d centres, %d px at %.3g µm/px; tumour %.0f %%, stroma "
        "%.0f %% of the area) with annotations and %s in %.1f s",
        len(slides),
        len({s.patient_id for s in slides}),
        cfg.n_centres,
        cfg.size_px,
        cfg.mpp,
        100 * np.mean([s["tumour_fraction"] for s in stats]),
        100 * np.mean([s["stroma_fraction"] for s in stats]),
        manifest,
        time.perf_counter() - start,
    )
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="config YAML/JSON file or inline JSON (default: built-in defaults)",
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        type=Path,
        help="folder for slides/, annotations/ and manifest.csv",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")


def run(args: argparse.Namespace) -> None:
    make_demo_cohort(load_config(args.config), args.out_dir, workers=max(1, args.workers))
