"""ASAP XML annotations (the CAMELYON16/17 format) as class-indexed polygons.

The format, as ASAP writes it::

    <ASAP_Annotations>
      <Annotations>
        <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
          <Coordinates>
            <Coordinate Order="0" X="10400.5" Y="7213.0" />
            ...
      <AnnotationGroups> <Group Name="Tumor" PartOfGroup="None" Color="#..."/> ...

- Class = `PartOfGroup`, mapped through `labels.classes` / `labels.aliases` (CAMELYON16 uses the
  groups `_0` and `_1` for tumour, CAMELYON17 `metastases`: map them with aliases, e.g.
  `{_0: Tumor, _1: Tumor}`). Coordinates are level-0 pixels; points are joined by `Order`.
- `Polygon`, `Spline` (its control points) and `Rectangle` annotations are regions; `Dot`,
  `PointSet` and other point/line types are skipped and counted, as are annotations in no group
  (`PartOfGroup="None"`).
- Exclusions (CAMELYON16 convention): annotations in the group `_2` or `Exclusion`
  (case-insensitive) mark non-tumour regions drawn inside tumour outlines. Unless you map that
  group to a class with `labels.aliases`, they are **holes**: their union is cut out of every other
  annotation of the slide, so those pixels are unannotated (labelled by `labels.unannotated`).
  Mapped to a class (e.g. `{_2: Background}`), they are painted as that class instead; being
  smaller than the outline around them, they are painted on top, which gives the same shape.
- Decimal commas (`X="10400,5"`, written by ASAP under some locales) are read as decimal points.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from stedm.config import LabelsConfig
from stedm.data.annotations import (
    AnnotationError,
    Annotations,
    clean_polygon,
    log_counts,
    polygonal_part,
    unknown_class_error,
)

EXCLUSION_GROUPS = ("_2", "exclusion")
REGION_TYPES = ("polygon", "spline", "rectangle")


def _number(text: str | None) -> float:
    if text is None:
        raise ValueError("missing coordinate")
    return float(text.strip().replace(",", "."))


def _coordinates(annotation: ET.Element) -> list[tuple[float, float]]:
    points = []
    for i, c in enumerate(annotation.iter("Coordinate")):
        order = c.get("Order")
        points.append(
            (
                float(order) if order is not None else float(i),
                _number(c.get("X")),
                _number(c.get("Y")),
            )
        )
    points.sort(key=lambda p: p[0])  # stable: equal or missing Order keeps file order
    return [(x, y) for _, x, y in points]


def load_asap_xml(path: Path, labels: LabelsConfig) -> Annotations:
    """Load an ASAP XML file; see the module docstring for classes, types and exclusions.

    Raises:
        AnnotationError: not XML, not an ASAP file, or an unknown group name.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(
            path, f"not valid XML ({exc})", "re-export the annotations from ASAP"
        ) from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(
            path,
            f"not an ASAP annotation file (root element <{root.tag}>)",
            "export ASAP XML (<ASAP_Annotations>) or use QuPath GeoJSON",
        )
    reasons: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    items: list[tuple[int, BaseGeometry]] = []
    holes: list[BaseGeometry] = []
    n_repaired = 0
    annotations = root.findall("./Annotations/Annotation")
    for annotation in annotations:
        kind = (annotation.get("Type") or "Polygon").strip()
        group = (annotation.get("PartOfGroup") or "").strip()
        if kind.lower() not in REGION_TYPES:
            reasons[f"{kind} annotation"] += 1
            continue
        if group.lower() in ("", "none"):
            reasons["no group"] += 1
            continue
        cls = labels.class_index(group)
        is_hole = cls is None and group.lower() in EXCLUSION_GROUPS
        if cls is None and not is_hole:
            unknown[group] += 1
            continue
        try:
            points = _coordinates(annotation)
        except ValueError:
            reasons["malformed coordinates"] += 1
            continue
        if len(points) < 3:
            reasons["fewer than 3 points"] += 1
            continue
        geometry, repaired, reason = clean_polygon(Polygon(points))
        if geometry is None:
            reasons[reason] += 1
            continue
        n_repaired += repaired
        if is_hole:
            holes.append(geometry)
        else:
            items.append((cls, geometry))
    if unknown:
        raise unknown_class_error(path, unknown, labels)
    if holes:
        items = _cut(items, shapely.union_all(holes), reasons)
    n_skipped = log_counts(path, reasons, len(annotations), n_repaired)
    return Annotations(
        path, items, n_features=len(annotations), n_repaired=n_repaired, n_skipped=n_skipped
    )


def _cut(
    items: list[tuple[int, BaseGeometry]], hole: BaseGeometry, reasons: Counter[str]
) -> list[tuple[int, BaseGeometry]]:
    """Subtract the exclusion union from every annotation; drop what is left empty."""
    out = []
    for cls, geometry in items:
        if geometry.intersects(hole):
            geometry, _, _ = clean_polygon(polygonal_part(geometry.difference(hole)))
            if geometry is None:
                reasons["inside an exclusion"] += 1
                continue
        out.append((cls, geometry))
    return out
