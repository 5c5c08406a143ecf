"""CATCH: COCO -> GeoJSON in CATCH's painting order, `stedm import-catch`, the paper presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
from catch_fixture import make_catch_fixture
from workflow_utils import ROOT, snakemake

from stedm.cli import main
from stedm.config import LabelsConfig, load_config
from stedm.data.annotations import Annotations, load_annotations
from stedm.data.catch import (
    CATEGORIES,
    coco_to_features,
    import_catch,
    parse_slide_name,
    read_datasets_csv,
)
from stedm.data.check import check_data
from stedm.data.manifest import read_manifest
from stedm.errors import StedmError
from stedm.io import read_json

CATCH_YAML = ROOT / "configs" / "catch.yaml"
ALL = LabelsConfig(classes=("Background", *CATEGORIES.values()))  # multi-class: index = CATCH id
FILL = 255


def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]


def coco(category: int, segmentation: list, i: int) -> dict:
    return {"id": i, "image_id": 1, "category_id": category, "segmentation": segmentation}


def paint_in_file_order(annotations: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """The reference: CATCH's semantics, each polygon painted in turn, later on top."""
    from shapely.geometry import Polygon

    out = np.full(shape, FILL, np.uint8)
    for a in annotations:
        flat = a["segmentation"]
        poly = Polygon(list(zip(flat[0::2], flat[1::2], strict=True)))
        single = Annotations(Path("-"), [(a["category_id"], poly)])
        out[single.rasterize(0, 0, shape[1], shape[0], 1.0, FILL) != FILL] = a["category_id"]
    return out


def test_coco_conversion_keeps_catchs_file_order(tmp_path):
    dermis, epidermis, necrosis, melanoma = 3, 4, 6, 7
    # .3 offsets: no pixel centre on an edge, so the reference and ours must agree exactly
    annotations = [
        coco(dermis, box(10.3, 10.3, 90.3, 90.3), 1),
        coco(necrosis, box(20.3, 20.3, 40.3, 40.3), 2),  # small, earlier
        coco(melanoma, box(30.3, 30.3, 80.3, 80.3), 3),  # larger, later: wins where they overlap
        coco(epidermis, box(50.3, 50.3, 60.3, 60.3), 4),
        coco(melanoma, [box(45.3, 45.3, 65.3, 65.3)], 5),  # COCO's nested list; hides the epidermis
    ]
    features, counts = coco_to_features(annotations, CATEGORIES)
    assert len(features) == 4 and counts["covered"] == 1 and counts["repaired"] == 0
    assert [f["properties"]["coco"]["id"] for f in features] == [1, 2, 3, 5]
    assert features[1]["properties"]["classification"]["name"] == "Inflamm/Necrosis"
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    ours = load_annotations(path, ALL).rasterize(0, 0, 100, 100, 1.0, FILL)
    reference = paint_in_file_order(
        [
            {
                **a,
                "segmentation": a["segmentation"][0]
                if isinstance(a["segmentation"][0], list)
                else a["segmentation"],
            }
            for a in annotations
        ],
        (100, 100),
    )
    assert np.array_equal(ours, reference)
    assert ours[35, 35] == melanoma and ours[25, 25] == necrosis and ours[55, 55] == melanoma
    assert ours[15, 15] == dermis and ours[5, 5] == FILL
    # without the conversion, painting by area would put the small necrosis on top
    raw = Annotations(Path("-"), [(a["category_id"], shape_of(a)) for a in annotations[:3]])
    assert raw.rasterize(0, 0, 100, 100, 1.0, FILL)[35, 35] == necrosis


def shape_of(annotation: dict):
    from shapely.geometry import Polygon

    flat = annotation["segmentation"]
    return Polygon(list(zip(flat[0::2], flat[1::2], strict=True)))


def test_invalid_and_empty_coco_polygons_are_repaired_or_counted():
    bowtie = [100, 10, 120, 30, 120, 10, 100, 30, 100, 10]
    features, counts = coco_to_features(
        [coco(7, bowtie, 1), coco(7, [1, 1, 2, 2], 2), coco(7, [], 3)], CATEGORIES
    )
    assert len(features) == 1 and counts["repaired"] == 1 and counts["empty"] == 2
    assert features[0]["geometry"]["type"] == "MultiPolygon"


def test_slide_names_and_datasets_csv(tmp_path):
    assert parse_slide_name("MCT_02_2.svs") == ("MCT_02", "MCT")
    assert parse_slide_name("Trichoblastoma_34_3.svs") == ("Trichoblastoma_34", "Trichoblastoma")
    assert parse_slide_name("other.svs") == ("other", "")
    csv = tmp_path / "datasets.csv"
    csv.write_text(
        "\ufeffSlide;Dataset;Scanner\nMCT_01_1.svs;test;ScanScope v1\nSCC_02_1.svs;val;AT2\n"
    )
    assert read_datasets_csv(csv) == {"MCT_01_1.svs": "test", "SCC_02_1.svs": "val"}
    csv.write_text("Slide;Dataset;Scanner\nMCT_01_1.svs;holdout;AT2\n")
    with pytest.raises(StedmError, match="holdout"):
        read_datasets_csv(csv)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("catch")
    make_catch_fixture(root / "raw", n_patients_per_type=3)
    assert (
        main(
            [
                "import-catch",
                "--catch-dir",
                str(root / "raw"),
                "--out-dir",
                str(root / "out"),
                "--config",
                str(CATCH_YAML),
            ]
        )
        == 0
    )
    return root


def test_fixture_slides_read_as_aperio_with_mpp(imported):
    with openslide.OpenSlide(str(imported / "raw" / "MCT_01_1.svs")) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == 0.25
        assert osr.dimensions == (1536, 1024) and osr.level_count == 3


def test_import_writes_the_manifest_by_dog_and_official_split(imported):
    records = read_manifest(imported / "out" / "manifest.csv", check_files=True)
    assert len(records) == 7 * 3 + 2 and len({r.patient_id for r in records}) == 21
    by_id = {r.slide_id: r for r in records}
    h = by_id["Histiocytoma_03_2"]
    # CATCH train -> empty split: assigned to a budget or the style pool by `stedm split`
    assert (h.patient_id, h.group, h.split) == ("Histiocytoma_03", "Histiocytoma", "")
    assert by_id["MCT_01_1"].split == "test" and by_id["MCT_02_1"].split == "val"
    assert sorted(r.split for r in records).count("test") == 8  # 7 dogs, one with two slides
    assert h.slide_path == (imported / "raw" / "Histiocytoma_03_2.svs").resolve()
    # the GeoJSON keeps CATCH's class names; configs/catch.yaml maps them to tumour vs background
    data = json.loads(h.annotation_path.read_text())
    names = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert names == ["Dermis", "Epidermis", "Histiocytoma", "Inflamm/Necrosis"]
    labels = load_config(CATCH_YAML).labels
    out = load_annotations(h.annotation_path, labels).rasterize(0, 0, 1536, 1024, 1.0, FILL)
    # tumour ellipse around (w/2, 0.55 h) with the necrosis (last in the file) on top of it
    assert out[563, 768 - 150] == 1 and out[563, 768 + 150] == 1  # Histiocytoma -> Tumor
    assert out[563, 768] == 0  # Inflamm/Necrosis -> Background, painted over the tumour
    assert out[300, 768] == 0 and out[0, 0] == FILL  # dermis -> Background; glass unannotated


def test_check_data_and_split_on_the_imported_cohort(imported, tmp_path):
    config = {
        **load_config(CATCH_YAML).to_dict(),
        "results_dir": str(tmp_path),
        "splits": {"budgets": [3, 6], "n_val": 1, "n_test": 1, "seed": 0},
        "cohort": {"source": "manifest", "manifest": str(imported / "out" / "manifest.csv")},
    }
    problems, summary = check_data(imported / "out" / "manifest.csv", load_config(config))
    assert problems == []
    assert summary["roles"] == {"test": 8, "val": 7, "auto": 8}
    assert summary["formats"] == {".svs (aperio)": 23} and summary["mpp_range"] == [0.25, 0.25]
    s = summary["slides"]["SCC_03_1"]
    slide_mm2 = 1536 * 1024 * 0.25**2 / 1e6
    assert 0.3 * slide_mm2 < s["tissue_mm2"] < 0.6 * slide_mm2  # the dermis ellipse
    assert 0 < s["class_mm2"]["Tumor"] < s["class_mm2"]["Background"] < s["tissue_mm2"] * 1.2
    out = tmp_path / "splits.json"
    assert (
        main(
            [
                "split",
                "--manifest",
                str(imported / "out" / "manifest.csv"),
                "--out",
                str(out),
                "--config",
                json.dumps({"splits": config["splits"]}),
            ]
        )
        == 0
    )
    splits = read_json(out)
    assert len(splits["test"]) == 8 and len(splits["val"]) == 7
    assert all(s.split("_")[1] == "01" for s in splits["test"])  # CATCH's test dogs, unchanged
    # train dogs (the 8 "auto" slides) become budgets and the style pool, stratified by type
    assert set(splits["budgets"]["3"]) < set(splits["budgets"]["6"])
    assert len({s.split("_")[0] for s in splits["budgets"]["6"]}) >= 5
    assert splits["style_pool"] and all(s.split("_")[1] == "03" for s in splits["style_pool"])


def test_import_errors_name_the_fix(imported, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("CATCH.json", "datasets.csv", "MCT_01_1.svs"):
        (raw / name).symlink_to(imported / "raw" / name)
    with pytest.raises(StedmError, match="--allow-missing"):
        import_catch(raw, tmp_path / "out")
    records = import_catch(raw, tmp_path / "out", allow_missing=True)
    assert [r.slide_id for r in records] == ["MCT_01_1"]
    with pytest.raises(StedmError, match="not mapped by labels"):
        import_catch(
            raw,
            tmp_path / "out2",
            config={"labels": {"classes": ["Background", "Tumor"]}},
            allow_missing=True,
        )
    with pytest.raises(StedmError, match="CATCH.json not found"):
        import_catch(tmp_path, tmp_path / "out3")


def test_paper_presets_load():
    catch = load_config(CATCH_YAML)
    assert (catch.tiling.mpp, catch.tiling.tile_size, catch.splits.budgets) == (2.0, 512, (42, 175))
    assert catch.stedm.batch_size * catch.stedm.grad_accum == 64 and catch.stedm.n_style == 10
    assert catch.labels.foreground_indices == (1,)
    assert {catch.labels.class_index(n) for n in CATEGORIES.values()} == {0, 1}
    her2 = load_config(ROOT / "configs" / "private_template.yaml")
    assert (her2.tiling.mpp, her2.splits.budgets) == (0.5, (6, 24))
    assert her2.labels.foreground_indices == (1, 2, 3, 4, 5)


def test_catch_preset_dry_run_plans_every_slide(imported, tmp_path):
    manifest = imported / "out" / "manifest.csv"
    result = snakemake(
        tmp_path,
        "-n",
        "--configfile",
        str(CATCH_YAML),
        "--config",
        f"cohort={{source: manifest, manifest: {manifest}}}",
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    table = result.stdout.split("Job stats:")[-1]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    assert counts["tile_slide"] == 23 and counts["make_splits"] == 1
    assert counts["train_stedm"] == 2  # budgets 42 and 175
    assert "results/catch/tiles/MCT_01_1.zarr" in result.stdout and "--budget 175" in result.stdout


def test_catch_preset_dry_run_with_slurm_profile(imported, tmp_path):
    """The SLURM profile plans the same reproduction (no SLURM needed for a dry-run)."""
    manifest = imported / "out" / "manifest.csv"
    result = snakemake(
        tmp_path, "-n", "--workflow-profile", str(ROOT / "profiles" / "slurm"), "--jobs", "20",
        "--configfile", str(CATCH_YAML), "--config", f"cohort={{source: manifest, manifest: {manifest}}}",
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    table = result.stdout.split("Job stats:")[-1]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    assert counts["tile_slide"] == 23 and counts["train_stedm"] == 2
    assert counts["train_segmentation"] == 2 * 3 * 3  # budgets x arms x seeds
    assert "slurm" in (result.stdout + result.stderr).lower()


@pytest.mark.slow
def test_imported_catch_folder_runs_through_the_whole_workflow(imported, tmp_path):
    """Import -> tiles -> splits -> autoencoder -> STEDM -> synthesis -> segmentation -> report,
    with CATCH's classes mapped by the paper preset's labels and tiny models."""
    import yaml

    labels = yaml.safe_load(CATCH_YAML.read_text())["labels"]
    manifest = imported / "out" / "manifest.csv"
    config = {
        "cohort": {"source": "manifest", "manifest": str(manifest)},
        "labels": labels,
        "tiling": {"mpp": 1.0, "tile_size": 64, "min_tissue_fraction": 0.3},
        "splits": {"budgets": [2, 4], "n_val": 1, "n_test": 1},
        "autoencoder": {"steps": 6, "batch_size": 4},
        "stedm": {"steps": 6, "batch_size": 4, "n_style": 2, "checkpoint_every": 3},
        "synthesis": {"n_samples": 8, "n_shards": 1, "batch_size": 4, "steps": 3},
        "segmentation": {"steps": 4, "batch_size": 5, "val_every": 2},
    }
    result = snakemake(tmp_path, "--cores", "2", config=config)
    assert result.returncode == 0, result.stderr[-5000:]
    results = tmp_path / "results"
    splits = read_json(results / "splits" / "splits.json")
    test_dogs = {r.patient_id for r in read_manifest(manifest) if r.split == "test"}
    assert {splits["slides"][s]["patient_id"] for s in splits["test"]} == test_dogs  # official split kept
    metrics = read_json(results / "segmentation" / "budget~2" / "arm~real+stedm" / "seed~0" / "metrics.json")
    assert set(metrics["patients"]) == test_dogs
    assert (results / "report.md").read_text().count("real+stedm") >= 2
