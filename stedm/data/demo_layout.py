"""Demo cohort layouts: smooth random fields -> tissue/tumour polygons -> QuPath GeoJSON.

The polygons, not the fields, are rasterised for painting (pixel-centre rule, as the tiler does),
so every demo image agrees with its annotation pixel for pixel.
"""

from __future__ import annotations

import uuid

import numpy as np
import shapely
from scipy.ndimage import gaussian_filter
from shapely.geometry import MultiPolygon, Polygon, mapping
from skimage.measure import find_contours

GRID = 256  # layout resolution (cells per side): fields are smooth, so 256 is plenty
PRECISION = 0.01  # polygon coordinates are snapped to 1/100 px (short, exact GeoJSON)
CLASS_COLORS = {"Tumor": [200, 0, 0], "Stroma": [150, 200, 150]}  # QuPath's default colours


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
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
    tissue_field = prior / prior.max() + 0.2 * smooth_noise(rng, (GRID, GRID), GRID * 0.04)
    tissue_field -= 2.0 * (1 - edge) ** 2  # a soft push: outlines stay round near the edge
    level = np.quantile(tissue_field, 1 - rng.uniform(0.5, 0.62))  # glass: ~38–50 %
    tissue = _field_to_geometry(tissue_field, float(level), scale)
    tissue = _drop_small(tissue, 0.01 * area, 0.002 * area)
    # tumour: several components inside the tissue, irregular borders, sometimes with holes
    tumour = Polygon()
    for _ in range(10):  # a draw with no tumour left after clipping is rare; then redraw
        field = smooth_noise(rng, (GRID, GRID), GRID * 0.045)
        field += 0.35 * smooth_noise(rng, (GRID, GRID), GRID * 0.015)
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
