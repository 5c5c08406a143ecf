"""Annotation readers beside GeoJSON: ASAP XML (CAMELYON), label masks, QuPath's bare-list export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from stedm.config import LabelsConfig
from stedm.data.annotations import AnnotationError, load_annotations
from stedm.data.readers_mask import MaskAnnotations

LABELS = LabelsConfig(
    classes=("Background", "Stroma", "Tumor"),
    aliases={"_0": "Tumor", "_1": "Tumor", "metastases": "Tumor"},
)
BG, STROMA, TUMOR, FILL = 0, 1, 2, 255


# -- ASAP XML ----------------------------------------------------------------------------------
def asap_annotation(
    group: str,
    points: list[tuple[float, float]],
    kind: str = "Polygon",
    order: list[int] | None = None,
    comma: bool = False,
) -> str:
    order = order or list(range(len(points)))
    coords = "".join(
        f'<Coordinate Order="{o}" X="{str(x).replace(".", ",") if comma else x}" Y="{y}" />'
        for o, (x, y) in sorted(zip(order, points, strict=True))
    )
    return (
        f'<Annotation Name="a" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


def asap(path: Path, *annotations: str) -> Path:
    groups = '<Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>'
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(annotations)
        + f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    )
    return path


def rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_asap_groups_aliases_order_types_and_camelyon16_exclusions(tmp_path):
    # points listed out of order (Order decides), decimal comma, CAMELYON16 groups _0/_1/_2
    tumour = asap_annotation("_0", [(60, 10), (10, 10), (10, 60), (60, 60)], order=[1, 0, 3, 2])
    second = asap_annotation("_1", rect(70.5, 10, 90.5, 30), kind="Spline", comma=True)
    exclusion = asap_annotation("_2", rect(20, 20, 30, 30))
    stroma = asap_annotation("Stroma", rect(0, 70, 40, 90), kind="Rectangle")
    dot = asap_annotation("_0", [(5, 5)], kind="Dot")
    ungrouped = asap_annotation("None", rect(0, 0, 5, 5))
    path = asap(tmp_path / "c16.xml", tumour, second, exclusion, stroma, dot, ungrouped)
    ann = load_annotations(path, LABELS)
    assert ann.stats == {"n_features": 6, "n_repaired": 0, "n_skipped": 2}  # the dot, "None"
    out = ann.rasterize(0, 0, 100, 100, 1.0, FILL)
    assert out[40, 40] == TUMOR and out[10, 10] == TUMOR and out[59, 59] == TUMOR
    assert out[60, 60] == FILL
    # the exclusion is a hole: unannotated, not painted as anything
    assert out[25, 25] == FILL and out[20, 20] == FILL and out[19, 25] == TUMOR
    assert (out == TUMOR).sum() == 50 * 50 - 10 * 10 + 20 * 20
    # "70,5" is 70.5: pixel centres 70.5 .. 89.5 are inside (a centre on the left edge counts)
    assert out[20, 70] == TUMOR and out[20, 89] == TUMOR and out[20, 90] == FILL
    assert out[80, 20] == STROMA and (out == STROMA).sum() == 40 * 20


def test_asap_exclusion_mapped_to_a_class_is_painted(tmp_path):
    labels = LabelsConfig(classes=LABELS.classes, aliases={**LABELS.aliases, "_2": "Background"})
    path = asap(
        tmp_path / "a.xml",
        asap_annotation("_0", rect(10, 10, 60, 60)),
        asap_annotation("_2", rect(20, 20, 30, 30)),
    )
    out = load_annotations(path, labels).rasterize(0, 0, 64, 64, 1.0, FILL)
    assert out[25, 25] == BG and out[40, 40] == TUMOR and (out == BG).sum() == 100


def test_asap_exclusion_covering_a_whole_annotation_drops_it(tmp_path):
    path = asap(
        tmp_path / "a.xml",
        asap_annotation("_0", rect(10, 10, 20, 20)),
        asap_annotation("Exclusion", rect(0, 0, 50, 50)),
    )
    ann = load_annotations(path, LABELS)
    assert ann.items == [] and ann.stats["n_skipped"] == 1


def test_asap_unknown_group_and_wrong_xml_name_the_file_and_fix(tmp_path):
    path = asap(
        tmp_path / "a.xml",
        asap_annotation("Necrosis", rect(0, 0, 9, 9)),
        asap_annotation("Necrosis", rect(0, 0, 9, 9)),
    )
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, LABELS)
    assert str(path) in str(err.value) and "'Necrosis' (2x)" in str(err.value)
    assert "labels.aliases" in err.value.fix and err.value.unknown == {"Necrosis": 2}
    other = tmp_path / "other.xml"
    other.write_text("<Annotations><Annotation/></Annotations>")
    with pytest.raises(AnnotationError, match="not an ASAP annotation file"):
        load_annotations(other, LABELS)
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(AnnotationError, match="not valid XML"):
        load_annotations(broken, LABELS)


# -- label masks -------------------------------------------------------------------------------
def write_mask(path: Path, mask: np.ndarray, sidecar: dict | None) -> Path:
    if path.suffix == ".png":
        Image.fromarray(mask).save(path)
    else:
        tifffile.imwrite(path, mask)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_label_mask_is_sampled_at_pixel_centres_with_its_downsample(tmp_path):
    mask = np.zeros((10, 20), np.uint8)
    mask[2:5, 3:8] = 7  # tumour code
    mask[6:9, 10:20] = 3  # stroma code
    mask[0, 0] = 9  # a value the sidecar does not list: unannotated, counted as skipped
    mask[9, 19] = 4  # listed as null: unannotated on purpose, not counted
    sidecar = {"downsample": 4, "classes": {"7": "_0", "3": "Stroma", "4": None}}
    path = write_mask(tmp_path / "s01.mask.png", mask, sidecar)
    ann = load_annotations(path, LABELS)
    assert isinstance(ann, MaskAnnotations) and ann.mask_size == (20, 10)
    assert ann.stats == {"n_features": 2, "n_repaired": 0, "n_skipped": 1}
    full = ann.rasterize(0, 0, 80, 40, 1.0, FILL)  # level-0 resolution: each mask px = 4x4
    assert (full == TUMOR).sum() == 3 * 5 * 16 and (full == STROMA).sum() == 3 * 10 * 16
    assert full[8, 12] == TUMOR and full[7, 12] == FILL and full[19, 31] == TUMOR
    assert full[20, 31] == FILL and full[0, 0] == FILL and full[39, 79] == FILL
    # coarser than the mask, with an offset: output px (r, c) has its centre at level-0
    # (2 + 8c + 4, 8r + 4), i.e. mask pixel (row 2r + 1, column 2c + 1)
    coarse = ann.rasterize(2, 0, 12, 6, 8.0, FILL)
    assert coarse[1].tolist() == [FILL] + [TUMOR] * 3 + [FILL] * 8
    assert coarse[3].tolist() == [FILL] * 5 + [STROMA] * 5 + [FILL] * 2  # columns 21, 23: outside
    assert (coarse == TUMOR).sum() == 3 and (coarse == STROMA).sum() == 5
    # a fill array (e.g. tissue-dependent) is kept where the mask says nothing
    fill = np.full((6, 12), 9, np.uint8)
    assert ann.rasterize(2, 0, 12, 6, 8.0, fill)[0, 0] == 9 and fill[1, 2] == 9


def test_label_mask_16bit_tiff_and_listed_background(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[:4] = 1000
    path = write_mask(
        tmp_path / "m.mask.tif",
        mask,
        {"downsample": 0.5, "classes": {"0": "Background", "1000": "Tumor"}},
    )
    out = load_annotations(path, LABELS).rasterize(0, 0, 4, 4, 1.0, FILL)
    assert out.tolist() == [[TUMOR] * 4] * 2 + [[BG] * 4] * 2


def test_label_mask_errors_name_the_file_and_the_fix(tmp_path):
    mask = np.zeros((4, 4), np.uint8)
    no_sidecar = write_mask(tmp_path / "a.mask.png", mask, None)
    with pytest.raises(AnnotationError) as err:
        load_annotations(no_sidecar, LABELS)
    assert "a.mask.json" in str(err.value) and '"downsample"' in err.value.fix
    unknown = write_mask(tmp_path / "b.mask.png", mask, {"downsample": 2, "classes": {"1": "Fat"}})
    with pytest.raises(AnnotationError) as err:
        load_annotations(unknown, LABELS)
    assert str(err.value).startswith(str(tmp_path / "b.mask.json")) and "'Fat'" in str(err.value)
    bad_ds = write_mask(tmp_path / "c.mask.png", mask, {"downsample": 0, "classes": {}})
    with pytest.raises(AnnotationError, match="downsample"):
        load_annotations(bad_ds, LABELS)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    rgb = write_mask(tmp_path / "d.mask.png", colour, {"downsample": 2, "classes": {"1": "Tumor"}})
    with pytest.raises(AnnotationError, match="one channel"):
        load_annotations(rgb, LABELS)
    # pointing annotation_path at the sidecar says so
    with pytest.raises(AnnotationError, match="label-mask sidecar"):
        load_annotations(tmp_path / "b.mask.json", LABELS)


# -- QuPath GeoJSON, bare-list export ----------------------------------------------------------
def test_qupath_bare_list_export_loads(tmp_path):
    """QuPath's "Export objects as GeoJSON" without "Export as FeatureCollection": a bare list."""
    features = [
        {
            "type": "Feature",
            "id": "0d7a6c1e-5a1b-4c38-9c71-0b0c9b5e2f11",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]],
            },
            "properties": {
                "objectType": "annotation",
                "isLocked": False,
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            },
        },
        {
            "type": "Feature",
            "id": "2",  # QuPath 0.2: no objectType
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]],
            },
            "properties": {"classification": {"name": "Stroma", "colorRGB": -6895466}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [5, 5]},
            "properties": {"objectType": "detection"},
        },
    ]
    path = tmp_path / "export.geojson"
    path.write_text(json.dumps(features))
    ann = load_annotations(path, LABELS)
    assert ann.stats == {"n_features": 3, "n_repaired": 0, "n_skipped": 1}
    out = ann.rasterize(0, 0, 40, 40, 1.0, FILL)
    assert (out == TUMOR).sum() == 400 and (out == STROMA).sum() == 1600 - 400


# -- every reader gives the tiler the same labels ----------------------------------------------
def test_geojson_asap_and_mask_tile_to_identical_labels(tmp_path):
    from stedm.config import load_config
    from stedm.data.manifest import SlideRecord
    from stedm.data.tiff import write_pyramidal_tiff
    from stedm.tiling.store import open_tile_store
    from stedm.tiling.tiler import tile_slide

    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[128:384, 128:384] = (200, 110, 170)
    slide = tmp_path / "s.tiff"
    write_pyramidal_tiff(slide, rgb, 1.0, n_levels=2, compression="zlib")
    # Stroma 128..384 with Tumor 192..320 inside, in level-0 px, three ways
    gj = tmp_path / "s.geojson"
    gj.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "properties": {"classification": {"name": name}},
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[list(p) for p in rect(a, a, b, b)]],
                    },
                }
                for name, a, b in (("Stroma", 128, 384), ("Tumor", 192, 320))
            ]
        )
    )
    xml = asap(
        tmp_path / "s.xml",
        asap_annotation("Stroma", rect(128, 128, 384, 384)),
        asap_annotation("_0", rect(192, 192, 320, 320)),
    )
    mask = np.zeros((64, 64), np.uint8)  # downsample 8
    mask[16:48, 16:48] = 1
    mask[24:40, 24:40] = 2
    png = write_mask(
        tmp_path / "s.mask.png", mask, {"downsample": 8, "classes": {"1": "Stroma", "2": "Tumor"}}
    )
    config = load_config(
        {
            "labels": {"classes": list(LABELS.classes), "aliases": LABELS.aliases},
            "tiling": {"mpp": 2.0, "tile_size": 32, "min_tissue_fraction": 0.1},
        }
    )
    labels = {}
    for ann in (gj, xml, png):
        record = SlideRecord(slide_id="s", patient_id="p", slide_path=slide, annotation_path=ann)
        tile_slide(record, config, tmp_path / f"{ann.suffix}.zarr", tmp_path / f"{ann.suffix}.png")
        store = open_tile_store(tmp_path / f"{ann.suffix}.zarr")
        labels[ann.suffix] = store.read(list(range(store.n)))[1]
    assert np.array_equal(labels[".geojson"], labels[".xml"])
    assert np.array_equal(labels[".geojson"], labels[".png"])
    # the tiles covering the tissue: Tumor = 128 x 128 level-0 px = 64 x 64 px at 2 µm/px
    assert (labels[".png"] == TUMOR).sum() == 64 * 64
    assert (labels[".png"] == STROMA).sum() == 128 * 128 - 64 * 64
