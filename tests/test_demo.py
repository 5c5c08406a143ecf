"""Tests of the demo cohort generator (`stedm make-demo-cohort`) and the stain maths it uses."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import tifffile
from shapely.geometry import Polygon, box, shape

from stedm.cli import main as cli_main
from stedm.config import load_config
from stedm.data import demo, demo_layout
from stedm.data.annotations import load_annotations
from stedm.data.manifest import read_manifest
from stedm.data.stain import (
    RGB_FROM_HED,
    concentrations_to_rgb,
    hed_jitter,
    rgb_to_concentrations,
    rgb_to_od,
)
from stedm.errors import StedmError

SIZE = 1024
SMALL = {"n_slides": 12, "size_px": SIZE, "n_two_slide_patients": 2, "n_centres": 4, "seed": 0}


def _config(**demo_overrides):
    return load_config({"cohort": {"demo": {**SMALL, **demo_overrides}}})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The small cohort, generated with two worker processes."""
    out = tmp_path_factory.mktemp("demo_a")
    return demo.make_demo_cohort(_config(), out, workers=2)


@pytest.fixture(scope="module")
def cohort_again(tmp_path_factory) -> Path:
    """The same cohort again, through the CLI with one process (inline JSON config)."""
    out = tmp_path_factory.mktemp("demo_b")
    config = json.dumps({"cohort": {"demo": SMALL}})
    assert cli_main(["make-demo-cohort", "--config", config, "--out-dir", str(out)]) == 0
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def slides(cohort):
    """Per slide: record, level-0 RGB, {class name: geometry}."""
    out = []
    for rec in read_manifest(cohort, check_files=True):
        rgb = tifffile.imread(rec.slide_path, key=0)
        fc = json.loads(rec.annotation_path.read_text())
        geoms = {
            f["properties"]["classification"]["name"]: shape(f["geometry"]) for f in fc["features"]
        }
        out.append((rec, rgb, geoms))
    return out


def _masks(geoms: dict, step: int = 2) -> tuple[np.ndarray, ...]:
    """Tumour / stroma / far-glass / deep-tissue masks on a strided grid of pixel centres."""
    y, x = np.mgrid[0:SIZE:step, 0:SIZE:step]
    xc, yc = x.ravel() + 0.5, y.ravel() + 0.5
    tissue = shapely.union(geoms["Tumor"], geoms["Stroma"])

    def inside(g):
        return shapely.contains_xy(g, xc, yc).reshape(y.shape)

    return (
        inside(geoms["Tumor"]),
        inside(geoms["Stroma"]),
        ~inside(tissue.buffer(2)),
        inside(tissue.buffer(-2)),
    )


# --------------------------------------------------------------------------- slides + manifest


def test_slides_open_in_openslide_with_levels_and_mpp(cohort):
    for rec in read_manifest(cohort, check_files=True):
        with openslide.OpenSlide(str(rec.slide_path)) as slide:
            assert slide.properties["openslide.vendor"] == "generic-tiff"
            assert slide.level_count >= 3
            assert slide.dimensions == (SIZE, SIZE)
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-4)
            assert slide.level_downsamples[2] == pytest.approx(4.0)


def test_manifest_patients_splits_and_ids(cohort):
    records = read_manifest(cohort, check_files=True)
    plan = demo.plan_demo_cohort(_config().cohort.demo)
    assert [r.slide_id for r in records] == demo.demo_slide_ids(_config().cohort.demo)
    assert [r.slide_id for r in records] == [s.slide_id for s in plan]
    assert len(records) == 12 and records[0].slide_id == "demo_001"
    by_patient: dict[str, list] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, []).append(r)
        assert r.mpp is None
        assert r.group in {"centre_A", "centre_B", "centre_C", "centre_D"}
    pairs = [rs for rs in by_patient.values() if len(rs) == 2]
    assert len(by_patient) == 10 and len(pairs) == 2
    for rs in by_patient.values():
        assert {r.split for r in rs} == ({"test"} if len(rs) == 2 else {""})
        assert len({r.group for r in rs}) == 1  # one patient, one centre
    # paths in the CSV are relative to the manifest's folder
    text = cohort.read_text()
    assert "slides/demo_001.tiff" in text and str(cohort.parent) not in text


def test_plan_is_cheap_deterministic_and_validated():
    cfg = _config().cohort.demo
    assert demo.plan_demo_cohort(cfg) == demo.plan_demo_cohort(cfg)
    other = demo.plan_demo_cohort(_config(seed=1).cohort.demo)
    assert [s.seed for s in other] != [s.seed for s in demo.plan_demo_cohort(cfg)]
    ids = demo.demo_slide_ids(load_config(None).cohort.demo)
    assert len(ids) == 48 and len(set(ids)) == 48 and ids[-1] == "demo_048"
    with pytest.raises(StedmError, match="n_two_slide_patients"):
        demo.plan_demo_cohort(_config(n_two_slide_patients=7).cohort.demo)


def test_same_seed_same_files_different_seed_differs(cohort, cohort_again):
    a, b = read_manifest(cohort), read_manifest(cohort_again)
    assert [r.slide_id for r in a] == [r.slide_id for r in b]
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(
            tifffile.imread(ra.slide_path, key=0), tifffile.imread(rb.slide_path, key=0)
        )
        assert ra.annotation_path.read_text() == rb.annotation_path.read_text()
    cfg0, cfg1 = _config().cohort.demo, _config(seed=1).cohort.demo
    rgb0, fc0, _ = demo.generate_demo_slide(demo.plan_demo_cohort(cfg0)[0], cfg0)
    rgb1, fc1, _ = demo.generate_demo_slide(demo.plan_demo_cohort(cfg1)[0], cfg1)
    assert np.abs(rgb0.astype(int) - rgb1.astype(int)).mean() > 5
    assert fc0 != fc1


# --------------------------------------------------------------------------- annotations


def test_geojson_is_qupath_style_and_valid(cohort, slides):
    n_holes = n_multi = 0
    ids = set()
    for rec, _, _ in slides:
        fc = json.loads(rec.annotation_path.read_text())
        assert fc["type"] == "FeatureCollection"
        names = []
        for feature in fc["features"]:
            assert feature["type"] == "Feature"
            assert uuid.UUID(feature["id"]).version == 4
            ids.add(feature["id"])
            props = feature["properties"]
            assert props["objectType"] == "annotation"
            names.append(props["classification"]["name"])
            assert len(props["classification"]["color"]) == 3
            geom = shape(feature["geometry"])
            assert geom.geom_type in {"Polygon", "MultiPolygon"}
            assert geom.is_valid and not geom.is_empty
            assert box(0, 0, SIZE, SIZE).contains(geom)
            polys = list(getattr(geom, "geoms", [geom]))
            n_multi += geom.geom_type == "MultiPolygon"
            n_holes += sum(len(p.interiors) > 0 for p in polys)
        assert sorted(names) == ["Stroma", "Tumor"]
    assert n_holes > 0 and n_multi > 0
    assert len(ids) == 2 * len(slides)  # unique feature ids


def test_classes_are_disjoint_and_glass_fraction_plausible(slides):
    for rec, _, geoms in slides:
        tumour, stroma = geoms["Tumor"], geoms["Stroma"]
        assert tumour.intersection(stroma).area < 1.0, rec.slide_id  # shared borders only
        glass = 1 - (tumour.area + stroma.area) / SIZE**2
        assert 0.28 <= glass <= 0.55, (rec.slide_id, glass)
        assert tumour.area > 0.02 * SIZE**2


def test_image_agrees_with_polygons(slides):
    """Tumour is hematoxylin-dense, stroma eosin-rich, glass clear, to within 2 px of the borders."""
    for rec, rgb, geoms in slides:
        tumour, stroma, far_glass, deep_tissue = _masks(geoms)
        img = rgb[::2, ::2]
        glass_rgb = np.median(img[far_glass], axis=0)  # the slide's (tinted) glass colour
        conc = rgb_to_concentrations(img, RGB_FROM_HED, glass_rgb)
        hema, eosin = conc[..., 0], conc[..., 1]
        assert hema[tumour].mean() > hema[stroma].mean() + 0.15, rec.slide_id
        assert eosin[stroma].mean() > eosin[tumour].mean(), rec.slide_id
        od = rgb_to_od(img, glass_rgb).sum(-1)
        assert od[stroma].mean() > od[far_glass].mean() + 0.2, rec.slide_id
        # per pixel: glass stays clear and tissue stays stained right up to the polygon borders
        assert (od[far_glass] < 0.16).mean() > 0.995, rec.slide_id
        assert (od[deep_tissue] > 0.16).mean() > 0.995, rec.slide_id


def test_staining_clusters_by_centre_and_patient(slides):
    """Stroma colour differs much more between centres than between a patient's two sections."""
    feats, centres, patients = [], [], []
    for rec, rgb, geoms in slides:
        _, stroma, far_glass, _ = _masks(geoms)
        img = rgb[::2, ::2]
        feats.append(np.concatenate([rgb_to_od(img[stroma]).mean(0), img[far_glass].mean(0) / 255]))
        centres.append(rec.group)
        patients.append(rec.patient_id)
    feats = np.array(feats)
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    same_patient = [
        dist[i, j] for i in range(len(feats)) for j in range(i) if patients[i] == patients[j]
    ]
    other_centre = [
        dist[i, j] for i in range(len(feats)) for j in range(i) if centres[i] != centres[j]
    ]
    assert len(same_patient) == 2
    assert np.mean(other_centre) > 4 * max(same_patient)
    assert np.quantile(other_centre, 0.1) > max(same_patient)


def test_rasterize_uses_pixel_centres():
    square = Polygon(
        [(10, 10), (20, 10), (20, 30), (10, 30)], [[(12, 12), (14, 12), (14, 14), (12, 14)]]
    )
    mask = demo_layout.rasterize(square, 40)
    # pixel (x, y) has its centre at (x + 0.5, y + 0.5)
    assert (
        mask[10, 10] and mask[29, 19] and not mask[30, 10] and not mask[10, 20] and not mask[12, 12]
    )
    assert mask.sum() == 10 * 20 - 2 * 2
    assert not demo_layout.rasterize(Polygon(), 8).any()


def test_painted_classes_match_label_rasterisation(slides):
    """The label tiles (`stedm.data.annotations`) see the same classes the renderer painted."""
    labels = load_config(None).labels
    cfg = _config().cohort.demo
    plan = {s.slide_id: s for s in demo.plan_demo_cohort(cfg)}
    for rec, _, _ in slides[:3]:
        ann = load_annotations(rec.annotation_path, labels)
        label = ann.rasterize(0, 0, SIZE, SIZE, 1.0, fill=0)
        layout = demo_layout.make_layout(np.random.default_rng(plan[rec.slide_id].seed), SIZE)
        painted = np.zeros((SIZE, SIZE), np.uint8)
        painted[demo_layout.rasterize(layout["Stroma"], SIZE)] = labels.class_index("Stroma")
        painted[demo_layout.rasterize(layout["Tumor"], SIZE)] = labels.class_index("Tumor")
        assert (painted != label).mean() < 1e-4, rec.slide_id
        assert set(np.unique(label)) == {0, 1, 2}


# --------------------------------------------------------------------------- stain maths


def test_concentrations_round_trip_and_render():
    rgb = np.random.default_rng(0).integers(30, 250, size=(16, 16, 3), dtype=np.uint8)
    back = concentrations_to_rgb(rgb_to_concentrations(rgb))
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1
    pure_h = concentrations_to_rgb(np.array([[1.0, 0.0]]))
    assert pure_h[0, 2] > pure_h[0, 0] and pure_h[0, 2] > pure_h[0, 1]  # hematoxylin is blue-purple
    pure_e = concentrations_to_rgb(np.array([[0.0, 1.0]]))
    assert pure_e[0, 0] > pure_e[0, 2] > pure_e[0, 1]  # eosin is pink
    assert tuple(concentrations_to_rgb(np.zeros((1, 2)), background=(240, 230, 250))[0]) == (
        240,
        230,
        250,
    )


def test_hed_jitter_is_seeded_and_changes_stain():
    rgb = np.random.default_rng(1).integers(60, 230, size=(2, 32, 32, 3), dtype=np.uint8)
    a = hed_jitter(rgb, np.random.default_rng(5))
    b = hed_jitter(rgb, np.random.default_rng(5))
    assert a.shape == rgb.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - rgb.astype(int)).mean() > 2
    assert not np.array_equal(a[0] - rgb[0], a[1] - rgb[1])  # one draw per image
    same = hed_jitter(rgb[0], np.random.default_rng(5), sigma_scale=0.0, sigma_shift=0.0)
    assert np.abs(same.astype(int) - rgb[0].astype(int)).max() <= 1
    with pytest.raises(ValueError):
        hed_jitter(rgb[0, ..., :2], np.random.default_rng(0))
