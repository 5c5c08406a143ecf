"""Region annotations as class-indexed polygons (or a label mask), rasterised on demand.

`load_annotations(path, labels)` dispatches on the file suffix (`_LOADERS`):
- `.geojson` / `.json`: QuPath GeoJSON export (this module);
- `.xml`: ASAP XML, the CAMELYON format (`stedm.data.readers_asap`);
- `.png` / `.tif` / `.tiff`: a label-mask image with a JSON sidecar (`stedm.data.readers_mask`).

It returns `Annotations`: (class index, polygon in level-0 pixels) pairs plus counts of what was
repaired or skipped, so a run's store records how much of the annotation file was actually used.
Label masks return `MaskAnnotations`, the same interface rasterised by sampling the mask. Every
reader maps class names through `labels.classes` / `labels.aliases`; an unknown name raises
`AnnotationError` naming the file, the names and the fix.

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


class AnnotationError(StedmError):
    """An annotation file that cannot be used; `what` went wrong and the `fix`, separately.

    Attributes:
        path: the annotation file.
        what: what is wrong (no path).
        fix: what the user should do.
        unknown: class names not mapped by the labels config (name -> count), if that is the problem.
    """

    def __init__(
        self, path: Path, what: str, fix: str, unknown: dict[str, int] | None = None
    ) -> None:
        super().__init__(f"{path}: {what}; {fix}")
        self.path, self.what, self.fix = path, what, fix
        self.unknown = dict(unknown or {})


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
def polygonal_part(geometry: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (make_valid or a difference may add lines or points)."""
    if isinstance(geometry, Polygon | MultiPolygon):
        return geometry
    parts = _polygons(geometry)
    return MultiPolygon(parts) if parts else Polygon()


def clean_polygon(geometry: BaseGeometry) -> tuple[BaseGeometry | None, bool, str | None]:
    """Validate a (Multi)Polygon for painting: (geometry or None, repaired?, reason if unusable).

    Invalid geometries (self-intersections, bow-ties) are repaired with `shapely.make_valid`,
    keeping only their polygonal part; empty or zero-area results are unusable.
    """
    if not isinstance(geometry, Polygon | MultiPolygon):
        return None, False, f"{geometry.geom_type} geometry"
    repaired = not geometry.is_empty and not geometry.is_valid
    if repaired:
        geometry = polygonal_part(shapely.make_valid(geometry))
    if geometry.is_empty or geometry.area <= 0:
        return None, False, "empty geometry"
    return geometry, repaired, None


def unknown_class_error(path: Path, unknown: Counter[str], labels: LabelsConfig) -> AnnotationError:
    """The error for class names the labels config does not map (shared by every reader)."""
    names = ", ".join(f"'{n}' ({c}x)" for n, c in sorted(unknown.items()))
    return AnnotationError(
        path,
        f"unknown annotation class name(s) {names}; known classes: {list(labels.classes)}",
        "add it to labels.classes or map it with labels.aliases",
        unknown=dict(unknown),
    )


def log_counts(path: Path, reasons: Counter[str], n_features: int, n_repaired: int) -> int:
    """Log what was skipped or repaired; returns the number of skipped features."""
    n_skipped = sum(reasons.values())
    if n_skipped:
        detail = ", ".join(f"{c} x {r}" for r, c in reasons.most_common())
        log.warning("%s: skipped %d of %d features (%s)", path, n_skipped, n_features, detail)
    if n_repaired:
        log.warning("%s: repaired %d invalid (e.g. self-intersecting) geometries", path, n_repaired)
    return n_skipped


def _features(data: Any, path: Path) -> list[Any]:
    """Features of QuPath's GeoJSON exports: a FeatureCollection, a bare list, or one Feature."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, dict) and "downsample" in data:
        raise AnnotationError(
            path,
            "this is a label-mask sidecar, not GeoJSON",
            "set annotation_path to the mask image next to it (e.g. <name>.mask.png)",
        )
    raise AnnotationError(
        path,
        "not a GeoJSON FeatureCollection, Feature or list of features",
        "export the annotations from QuPath with File > Export objects as GeoJSON",
    )


def _load_geojson(path: Path, labels: LabelsConfig) -> Annotations:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            path, f"not valid JSON ({exc})", "re-export it from QuPath as GeoJSON"
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
        geometry, repaired, reason = clean_polygon(geometry)
        if geometry is None:
            reasons[reason] += 1
            continue
        n_repaired += repaired
        items.append((cls, geometry))
    if unknown:
        raise unknown_class_error(path, unknown, labels)
    n_skipped = log_counts(path, reasons, len(features), n_repaired)
    return Annotations(
        path, items, n_features=len(features), n_repaired=n_repaired, n_skipped=n_skipped
    )


def _load_asap(path: Path, labels: LabelsConfig) -> Annotations:
    from stedm.data.readers_asap import load_asap_xml  # imported late: it imports this module

    return load_asap_xml(path, labels)


def _load_mask(path: Path, labels: LabelsConfig) -> Annotations:
    from stedm.data.readers_mask import load_label_mask

    return load_label_mask(path, labels)


# suffix -> loader
_LOADERS: dict[str, Callable[[Path, LabelsConfig], Annotations]] = {
    ".geojson": _load_geojson,
    ".json": _load_geojson,
    ".xml": _load_asap,
    ".png": _load_mask,
    ".tif": _load_mask,
    ".tiff": _load_mask,
}


def load_annotations(path: str | Path, labels: LabelsConfig) -> Annotations:
    """Load a slide's region annotations.

    Args:
        path: one of
            - QuPath GeoJSON (`.geojson` / `.json`): a FeatureCollection, a list of features or a
              single feature; classes from `properties.classification.name`, coordinates in
              level-0 pixels;
            - ASAP XML (`.xml`, CAMELYON): class = `PartOfGroup`; groups `_2` / `Exclusion` not
              mapped to a class are holes cut from the slide's other annotations;
            - a label mask (`.png` / `.tif` / `.tiff`): pixel values are class codes, described by
              the sidecar `<mask stem>.json`: `{"downsample": 16, "classes": {"1": "Tumor"}}`.
        labels: class names and aliases mapping names to label indices.

    Raises:
        StedmError: missing or malformed file, unsupported format, or an unknown class name
            (an `AnnotationError` naming the file, what is wrong and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(
            path, "annotation file not found", "check annotation_path in the manifest"
        )
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise AnnotationError(
            path,
            f"unsupported annotation format '{path.suffix}'",
            f"use one of {sorted(_LOADERS)} (QuPath GeoJSON, ASAP XML, label mask + .json sidecar)",
        )
    return loader(path, labels)
