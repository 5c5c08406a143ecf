"""Region annotations (QuPath GeoJSON) as class-indexed polygons, rasterised on demand.

`load_annotations(path, labels)` dispatches on the file type (only QuPath GeoJSON today; an ASAP
XML or label-mask reader plugs into `_LOADERS`) and returns `Annotations`: (class index, polygon
in level-0 pixels) pairs plus counts of what was repaired or skipped, so a run's store records
how much of the annotation file was actually used.

Rasterisation paints larger polygons first, so an annotation drawn inside another (a tumour
island inside a stroma region) wins; holes reveal what lies underneath. A pixel belongs to a
polygon when its centre lies inside it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry

from stedm.config import LabelsConfig
from stedm.errors import StedmError

log = logging.getLogger(__name__)


@dataclass
class Annotations:
    """Class-indexed polygons of one slide, in level-0 pixel coordinates.

    Attributes:
        path: the annotation file.
        items: (class index, Polygon | MultiPolygon) in paint order (largest area first).
        n_features: features in the file.
        n_repaired: invalid geometries repaired with `shapely.make_valid`.
        n_skipped: features not used (not an annotation, unclassified, empty or not polygonal).
    """

    path: Path
    items: list[tuple[int, BaseGeometry]]
    n_features: int = 0
    n_repaired: int = 0
    n_skipped: int = 0
    _tree: shapely.STRtree | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.items.sort(key=lambda item: -item[1].area)  # stable: equal areas keep file order
        self._geometries = np.array([g for _, g in self.items], dtype=object)
        self._classes = np.array([c for c, _ in self.items], dtype=np.uint8)
        self._tree = shapely.STRtree(self._geometries) if self.items else None

    @property
    def stats(self) -> dict[str, int]:
        return {
            "n_features": self.n_features,
            "n_repaired": self.n_repaired,
            "n_skipped": self.n_skipped,
        }

    def rasterize(
        self,
        x0: float,
        y0: float,
        width_px: int,
        height_px: int,
        scale: float,
        fill: int | np.ndarray,
    ) -> np.ndarray:
        """Class-index image of a region.

        Args:
            x0, y0: top-left corner in level-0 pixels.
            width_px, height_px: output size.
            scale: level-0 pixels per output pixel.
            fill: value of pixels no annotation covers, or an (height_px, width_px) uint8 array
                of such values (e.g. different values inside and outside tissue); not modified.

        Returns:
            (height_px, width_px) uint8.
        """
        if isinstance(fill, np.ndarray):
            out = np.array(fill, dtype=np.uint8, copy=True)
        else:
            out = np.full((height_px, width_px), fill, dtype=np.uint8)
        if self._tree is None:
            return out
        x1, y1 = x0 + width_px * scale, y0 + height_px * scale
        # bounding-box candidates (cheap); clipping drops those that miss the region
        hits = np.sort(self._tree.query(shapely.box(x0, y0, x1, y1)))
        # Batches of polygons share one vectorised scanline; bounded so masks stay small.
        batch = max(1, _MAX_MASK_CELLS // (height_px * (width_px + 1)))
        for start in range(0, hits.size, batch):
            index = hits[start : start + batch]
            masks = _inside_masks(self._geometries[index], x0, y0, width_px, height_px, scale)
            for cls, mask in zip(self._classes[index], masks, strict=True):
                out[mask] = cls  # in paint order: larger first, smaller on top
        return out


_MAX_MASK_CELLS = 4_000_000


def _polygons(geometry: BaseGeometry) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    if hasattr(geometry, "geoms"):
        return [p for g in geometry.geoms for p in _polygons(g)]
    return []


def _inside_masks(
    geometries: np.ndarray, x0: float, y0: float, width: int, height: int, scale: float
) -> np.ndarray:
    """(n, height, width) masks of pixels whose centre lies inside each (multi)polygon.

    A vectorised scanline: every ring edge toggles the inside/outside state of the pixels right
    of where it crosses a row of pixel centres (even-odd rule), so exteriors, holes and islands
    in holes need no special cases. Crossings are half-open in y and pixels count as inside
    from the crossing on: a pixel centre on a left edge is inside, on a right edge outside.
    Polygons are first clipped to (a margin around) the region, so huge annotations cost only
    their edges near it.
    """
    n = len(geometries)
    pad = 2 * scale
    clipped = shapely.clip_by_rect(
        geometries, x0 - pad, y0 - pad, x0 + width * scale + pad, y0 + height * scale + pad
    )
    parts, part_owner = shapely.get_parts(clipped, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)  # non-polygons have none
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    owner = part_owner[ring_part[coord_ring]] if coords.size else np.zeros(0, np.int64)
    # pixel-centre coordinates: output pixel (r, c) is centred on (c, r)
    xy = (coords - (x0, y0)) / scale - 0.5
    same_ring = coord_ring[:-1] == coord_ring[1:]
    (ax, ay), (bx, by) = xy[:-1][same_ring].T, xy[1:][same_ring].T
    geom = owner[:-1][same_ring]
    row_start = np.clip(np.ceil(np.minimum(ay, by)), 0, height).astype(np.int64)
    row_end = np.clip(np.ceil(np.maximum(ay, by)), 0, height).astype(np.int64)
    n_rows = row_end - row_start
    edge = np.repeat(np.arange(n_rows.size), n_rows)
    row = row_start[edge] + np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    ax, ay, bx, by = ax[edge], ay[edge], bx[edge], by[edge]
    x = ax + (row - ay) * (bx - ax) / (by - ay)
    col = np.clip(np.ceil(x), 0, width).astype(np.int64)
    cells = (geom[edge] * height + row) * (width + 1) + col
    toggles = np.bincount(cells, minlength=n * height * (width + 1)).reshape(n, height, width + 1)
    parity = np.cumsum(toggles, axis=2, dtype=np.int32)[:, :, :width]
    return (parity & 1).astype(bool)


# -- loading ---------------------------------------------------------------------------------
def _polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (make_valid may add lines or points at pinch points)."""
    if isinstance(geometry, Polygon | MultiPolygon):
        return geometry
    parts = _polygons(geometry)
    return MultiPolygon(parts) if parts else Polygon()


def _features(data: Any, path: Path) -> list[Any]:
    """Features of QuPath's GeoJSON exports: a FeatureCollection, a bare list, or one Feature."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise StedmError(
        f"{path}: not a GeoJSON FeatureCollection, Feature or list of features; export the "
        "annotations from QuPath with File > Export objects as GeoJSON"
    )


def _load_geojson(path: Path, labels: LabelsConfig) -> Annotations:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StedmError(
            f"{path} is not valid JSON ({exc}); re-export it from QuPath as GeoJSON"
        ) from exc
    features = _features(data, path)
    reasons: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    items: list[tuple[int, BaseGeometry]] = []
    n_repaired = 0
    for feature in features:
        props = (feature.get("properties") or {}) if isinstance(feature, dict) else {}
        object_type = props.get("objectType", "annotation")  # QuPath < 0.3 wrote no objectType
        if object_type != "annotation":
            reasons[f"objectType '{object_type}'"] += 1
            continue
        classification = props.get("classification")
        name = classification.get("name") if isinstance(classification, dict) else None
        if not name:
            reasons["no classification"] += 1
            continue
        cls = labels.class_index(name)
        if cls is None:
            unknown[name] += 1
            continue
        try:
            geometry = shape(feature.get("geometry"))
        except Exception:  # noqa: BLE001 - any malformed geometry is skipped and counted
            reasons["malformed geometry"] += 1
            continue
        if not isinstance(geometry, Polygon | MultiPolygon):
            reasons[f"{geometry.geom_type} geometry"] += 1
            continue
        repaired = not geometry.is_empty and not geometry.is_valid
        if repaired:
            geometry = _polygonal(shapely.make_valid(geometry))
        if geometry.is_empty or geometry.area <= 0:
            reasons["empty geometry"] += 1
            continue
        n_repaired += repaired
        items.append((cls, geometry))
    if unknown:
        names = ", ".join(f"'{n}' ({c}x)" for n, c in sorted(unknown.items()))
        raise StedmError(
            f"{path}: unknown annotation class name(s) {names}; known classes: "
            f"{list(labels.classes)}; add it to labels.classes or map it with labels.aliases"
        )
    n_skipped = sum(reasons.values())
    if n_skipped:
        detail = ", ".join(f"{c} x {r}" for r, c in reasons.most_common())
        log.warning("%s: skipped %d of %d features (%s)", path, n_skipped, len(features), detail)
    if n_repaired:
        log.warning("%s: repaired %d invalid (e.g. self-intersecting) geometries", path, n_repaired)
    return Annotations(
        path, items, n_features=len(features), n_repaired=n_repaired, n_skipped=n_skipped
    )


# suffix -> loader; add ASAP XML (.xml) or label masks (.png/.tif) here.
_LOADERS: dict[str, Callable[[Path, LabelsConfig], Annotations]] = {
    ".geojson": _load_geojson,
    ".json": _load_geojson,
}


def load_annotations(path: str | Path, labels: LabelsConfig) -> Annotations:
    """Load a slide's region annotations.

    Args:
        path: QuPath GeoJSON (`.geojson` / `.json`): a FeatureCollection, a list of features or a
            single feature; classes from `properties.classification.name`, coordinates in
            level-0 pixels.
        labels: class names and aliases mapping names to label indices.

    Raises:
        StedmError: missing or malformed file, unsupported format, or an unknown class name.
    """
    path = Path(path)
    if not path.is_file():
        raise StedmError(
            f"annotation file not found: {path} (check annotation_path in the manifest)"
        )
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise StedmError(
            f"{path}: unsupported annotation format '{path.suffix}'; supported: "
            f"{sorted(_LOADERS)} (QuPath GeoJSON export)"
        )
    return loader(path, labels)
