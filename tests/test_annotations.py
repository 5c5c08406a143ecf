"""`stedm.data.annotations`: QuPath GeoJSON loading, repair/skip counts and rasterisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stedm.config import LabelsConfig
from stedm.data.annotations import load_annotations
from stedm.errors import StedmError

LABELS = LabelsConfig(classes=("Background", "Stroma", "Tumor"), aliases={"Tumour": "Tumor"})
STROMA, TUMOR, FILL = 1, 2, 255


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, name: str | None, object_type: str = "annotation") -> dict:
    props: dict = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def polygon(*rings: list[list[float]]) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def collection(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def test_polygon_with_hole_and_pixel_centres(tmp_path):
    f = feature(polygon(square(10, 10, 50, 50), square(20, 20, 30, 30)), "Stroma")
    ann = load_annotations(write(tmp_path / "a.geojson", collection(f)), LABELS)
    out = ann.rasterize(0, 0, 64, 64, 1.0, FILL)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    # pixel k covers [k, k+1): inside the square are pixels 10..49
    assert out[10, 10] == STROMA and out[49, 49] == STROMA
    assert out[9, 30] == FILL and out[50, 30] == FILL and out[30, 9] == FILL
    # the hole covers pixels 20..29
    assert out[25, 25] == FILL and out[20, 20] == FILL and out[29, 29] == FILL
    assert out[19, 25] == STROMA and out[30, 25] == STROMA
    assert (out == STROMA).sum() == 40 * 40 - 10 * 10


def test_multipolygon_and_region_offset_and_scale(tmp_path):
    geometry = {
        "type": "MultiPolygon",
        "coordinates": [[square(100, 100, 140, 140)], [square(200, 100, 240, 140)]],
    }
    ann = load_annotations(
        write(tmp_path / "a.json", [feature(geometry, "Tumour")]), LABELS
    )  # bare list + alias
    out = ann.rasterize(
        80, 80, 50, 20, 4.0, FILL
    )  # 1 px = 4 level-0 px; covers x 80..280, y 80..160
    assert out.shape == (20, 50)
    assert out[10, (120 - 80) // 4] == TUMOR  # centre of part 1
    assert out[10, (220 - 80) // 4] == TUMOR  # centre of part 2
    assert out[10, (170 - 80) // 4] == FILL  # between the parts
    assert out[2, (120 - 80) // 4] == FILL  # above (y = 80..92)
    assert (out == TUMOR).sum() == 2 * 10 * 10


def test_nested_small_annotation_wins_and_holes_reveal_what_is_below(tmp_path):
    small = feature(polygon(square(40, 40, 60, 60)), "Tumor")
    large = feature(polygon(square(0, 0, 100, 100)), "Stroma")
    ring = feature(polygon(square(70, 70, 95, 95), square(80, 80, 85, 85)), "Tumor")
    ann = load_annotations(write(tmp_path / "a.geojson", collection(small, large, ring)), LABELS)
    out = ann.rasterize(0, 0, 100, 100, 1.0, FILL)
    assert out[50, 50] == TUMOR  # small inside large, listed first in the file: still on top
    assert out[10, 10] == STROMA
    assert out[72, 72] == TUMOR
    assert out[82, 82] == STROMA  # the hole shows the Stroma underneath, not the fill


def test_fill_array_and_region_without_annotations(tmp_path):
    ann = load_annotations(
        write(tmp_path / "a.geojson", collection(feature(polygon(square(0, 0, 8, 8)), "Stroma"))),
        LABELS,
    )
    base = np.zeros((16, 16), np.uint8)
    base[:, 8:] = FILL
    out = ann.rasterize(0, 0, 16, 16, 1.0, base)
    assert out[4, 4] == STROMA and out[12, 4] == 0 and out[12, 12] == FILL
    assert (base[:8, :8] == 0).all()  # the fill array is not modified
    far = ann.rasterize(1000, 1000, 8, 8, 1.0, 7)
    assert (far == 7).all()


def test_single_feature_and_case_insensitive_names(tmp_path):
    ann = load_annotations(
        write(tmp_path / "a.geojson", feature(polygon(square(0, 0, 4, 4)), "stroma")), LABELS
    )
    assert [c for c, _ in ann.items] == [STROMA]
    assert ann.stats == {"n_features": 1, "n_repaired": 0, "n_skipped": 0}


def test_bow_tie_is_repaired_and_skips_are_counted(tmp_path):
    bow_tie = feature(polygon([[0, 0], [40, 40], [40, 0], [0, 40], [0, 0]]), "Tumor")
    empty = feature({"type": "Polygon", "coordinates": []}, "Stroma")
    flat = feature(polygon([[0, 0], [10, 0], [20, 0], [0, 0]]), "Stroma")  # zero area
    point = feature({"type": "Point", "coordinates": [5, 5]}, "Tumor")
    detection = feature(polygon(square(0, 0, 5, 5)), "Tumor", object_type="detection")
    unclassified = feature(polygon(square(0, 0, 5, 5)), None)
    data = collection(bow_tie, empty, flat, point, detection, unclassified)
    ann = load_annotations(write(tmp_path / "a.geojson", data), LABELS)
    assert ann.stats == {"n_features": 6, "n_repaired": 1, "n_skipped": 5}
    ((cls, geometry),) = ann.items
    assert cls == TUMOR and geometry.is_valid and geometry.area == pytest.approx(800)
    out = ann.rasterize(0, 0, 40, 40, 1.0, FILL)
    assert out[20, 5] == TUMOR and out[20, 35] == TUMOR  # left and right triangles
    assert out[3, 20] == FILL and out[37, 20] == FILL  # top and bottom wedges are outside


def test_unknown_class_names_the_file_the_names_and_the_fix(tmp_path):
    data = collection(
        feature(polygon(square(0, 0, 4, 4)), "Necrosis"),
        feature(polygon(square(0, 0, 4, 4)), "Stroma"),
    )
    path = write(tmp_path / "unknown.geojson", data)
    with pytest.raises(StedmError) as err:
        load_annotations(path, LABELS)
    message = str(err.value)
    assert str(path) in message and "'Necrosis'" in message
    assert "labels.classes" in message and "labels.aliases" in message


def test_malformed_json_missing_and_unsupported_files(tmp_path):
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(StedmError, match="not valid JSON") as err:
        load_annotations(bad, LABELS)
    assert str(bad) in str(err.value)
    not_geojson = write(tmp_path / "other.json", {"hello": 1})
    with pytest.raises(StedmError, match="FeatureCollection") as err:
        load_annotations(not_geojson, LABELS)
    assert str(not_geojson) in str(err.value)
    with pytest.raises(StedmError, match="not found") as err:
        load_annotations(tmp_path / "missing.geojson", LABELS)
    assert "missing.geojson" in str(err.value)
    csv = tmp_path / "annotations.csv"
    csv.write_text("x,y,class\n")
    with pytest.raises(StedmError, match="unsupported annotation format") as err:
        load_annotations(csv, LABELS)
    assert str(csv) in str(err.value)


def test_rasterize_is_fast_with_many_polygons(tmp_path):
    """An STRtree limits the work per tile to the polygons that touch it."""
    import time

    features = [
        feature(polygon(square(x, y, x + 30, y + 30)), "Tumor")
        for x in range(0, 20000, 50)
        for y in range(0, 2000, 50)
    ]
    ann = load_annotations(write(tmp_path / "many.geojson", collection(*features)), LABELS)
    assert len(ann.items) == 400 * 40
    start = time.perf_counter()
    for k in range(100):
        out = ann.rasterize(k * 100, 0, 64, 64, 2.0, FILL)
    per_tile = (time.perf_counter() - start) / 100
    assert out[5, 5] == TUMOR and out[20, 20] == FILL  # (10..12 level-0) inside, (40..42) gap
    assert per_tile < 0.01
