"""`stedm check-data`: every problem of a manifest on one line each, then a summary with areas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stedm.cli import main
from stedm.config import load_config
from stedm.data.check import check_data
from stedm.data.tiff import write_pyramidal_tiff

# thumbnails at 16 µm/px of 1 µm/px slides: one thumbnail pixel = 16 x 16 level-0 px = 0.000256 mm²
CONFIG = {
    "labels": {"classes": ["Background", "Stroma", "Tumor"]},
    "tiling": {"thumbnail_mpp": 16.0},
    "splits": {"budgets": [2], "n_val": 1, "n_test": 1},
}
HEADER = "slide_id,patient_id,slide_path,annotation_path,group,split,mpp\n"


def slide(path: Path, mpp: float | None = 1.0) -> Path:
    """512 x 512 px of glass with a 256 x 256 px pink tissue square at (128, 128)."""
    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[128:384, 128:384] = (200, 110, 170)
    write_pyramidal_tiff(path, rgb, mpp, n_levels=2, compression="zlib")
    return path


def geojson(path: Path, *features: tuple[str, tuple[float, float, float, float]]) -> Path:
    feats = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
            },
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }
        for name, (x0, y0, x1, y1) in features
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def good_cohort(root: Path, n: int = 6) -> Path:
    """n one-slide patients, every slide annotated (Stroma square with a Tumor square inside)."""
    rows = []
    for i in range(n):
        slide(root / f"s{i}.tiff")
        geojson(
            root / f"s{i}.geojson",
            ("Stroma", (128, 128, 384, 384)),
            ("Tumor", (192, 192, 320, 320)),
        )
        rows.append(f"s{i},p{i},s{i}.tiff,s{i}.geojson,g{i % 2},,")
    manifest = root / "manifest.csv"
    manifest.write_text(HEADER + "\n".join(rows) + "\n")
    return manifest


def test_good_manifest_has_no_problem_and_areas_in_mm2(tmp_path, capsys):
    manifest = good_cohort(tmp_path)
    problems, summary = check_data(manifest, load_config(CONFIG))
    assert problems == []
    assert summary["n_slides"] == 6 and summary["n_patients"] == 6 and summary["n_annotated"] == 6
    assert summary["roles"] == {"auto": 6} and summary["groups"] == {"g0": 3, "g1": 3}
    assert summary["mpp_range"] == [1.0, 1.0] and summary["formats"] == {".tiff (generic-tiff)": 6}
    s0 = summary["slides"]["s0"]
    # tissue: the 256 px square = 0.256 mm x 0.256 mm; the detector's smoothing may grow it by up
    # to one thumbnail pixel (16 µm) on each side
    assert 0.256**2 <= s0["tissue_mm2"] <= (0.256 + 2 * 0.016) ** 2
    # annotations rasterised at the thumbnail: the nested Tumor is counted once, not twice
    assert s0["class_mm2"] == pytest.approx(
        {"Background": 0.0, "Stroma": 0.256**2 - 0.128**2, "Tumor": 0.128**2}
    )
    assert s0["annotation"] == {"n_features": 2, "n_repaired": 0, "n_skipped": 0}
    assert (
        main(
            [
                "check-data",
                "--manifest",
                str(manifest),
                "--config",
                json.dumps(CONFIG),
                "--json",
                str(tmp_path / "check.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "problem:" not in out and "6 slides, 6 patients, 6 annotated" in out
    assert json.loads((tmp_path / "check.json").read_text())["n_problems"] == 0


def test_broken_manifest_reports_every_problem_once(tmp_path, capsys):
    good_cohort(tmp_path, n=2)
    slide(tmp_path / "nompp.tiff", mpp=None)
    (tmp_path / "text.tiff").write_text("not a slide")
    geojson(tmp_path / "unknown.geojson", ("Necrosis", (128, 128, 200, 200)))
    geojson(tmp_path / "outside.geojson", ("Tumor", (5000, 5000, 6000, 6000)))
    # a mask of 8 x 8 px at downsample 8 covers 64 px of the 512 px slide
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m.mask.png")
    (tmp_path / "m.mask.json").write_text(json.dumps({"downsample": 8, "classes": {"1": "Tumor"}}))
    rows = [
        "s0,p0,s0.tiff,s0.geojson,,,",  # fine
        "s0,p9,s1.tiff,s1.geojson,,,",  # 3: duplicate id
        "s1,p1,missing.tiff,s1.geojson,,,",  # 4: slide missing
        "s2,p2,text.tiff,,,,",  # 5: not a slide
        "s3,p3,nompp.tiff,,,,",  # 6: no µm/px
        "s4,p4,s1.tiff,unknown.geojson,,,",  # 7: unknown class
        "s5,p5,s1.tiff,gone.geojson,,,",  # 8: annotation missing
        "s6,p6,s1.tiff,s1.geojson,,,abc",  # 9: bad mpp (then read from the file: fine)
        "s7,p7,s1.tiff,outside.geojson,,,",  # 10: nothing inside the slide
        "s8,p8,s1.tiff,m.mask.png,,,",  # 11: mask downsample wrong
        "s9,p10,s1.tiff,s1.geojson,,test,",  # 12-13: patient p10 in two roles
        "s10,p10,s1.tiff,s1.geojson,,val,",
        "s11,p11,s1.tiff,s1.geojson,,holdout,",  # 14: bad split
    ]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(HEADER + "\n".join(rows) + "\n")
    code = main(["check-data", "--manifest", str(manifest), "--config", json.dumps(CONFIG)])
    captured = capsys.readouterr()
    lines = [
        line.removeprefix("problem: ")
        for line in captured.out.splitlines()
        if line.startswith("problem: ")
    ]
    expected = [
        (f"{manifest}, line 3", "duplicate slide_id 's0' (first on line 2)"),
        (f"{manifest}, line 9", "mpp 'abc' is not a positive number"),
        (f"{manifest}, line 14", "split 'holdout' is not one of"),
        (str(tmp_path / "missing.tiff"), "slide file does not exist"),
        (str(tmp_path / "text.tiff"), "OpenSlide cannot open it"),
        (str(tmp_path / "nompp.tiff"), "records no µm/px -> fix: add its level-0 µm/px"),
        (str(tmp_path / "unknown.geojson"), "unknown annotation class name(s) 'Necrosis' (1x)"),
        (str(tmp_path / "gone.geojson"), "annotation file not found"),
        (str(tmp_path / "outside.geojson"), "no annotated area inside the slide"),
        (
            str(tmp_path / "m.mask.png"),
            "mask 8x8 px x downsample 8 does not cover the slide's "
            "512x512 level-0 px -> fix: set downsample in m.mask.json to ~64",
        ),
        (str(manifest), "patient 'p10' has slides in several roles ['test', 'val']"),
    ]
    assert code == 1 and len(lines) == len(expected), "\n".join(lines)
    for line, (file, what) in zip(lines, expected, strict=True):
        assert line.startswith(f"{file}: ") and what in line and " -> fix: " in line, line
    assert "11 problem(s)" in captured.err
    # the summary still comes after the problems
    assert "12 slides, 11 patients, 10 annotated" in captured.out


def test_too_few_patients_for_the_budgets_is_one_problem(tmp_path):
    manifest = good_cohort(tmp_path, n=4)
    config = load_config({**CONFIG, "splits": {"budgets": [2, 5], "n_val": 1, "n_test": 1}})
    problems, _ = check_data(manifest, config)
    assert len(problems) == 1 and problems[0].file == str(manifest)
    assert (
        "cannot split by patient" in problems[0].what
        and "largest budget needs 5" in problems[0].what
    )
