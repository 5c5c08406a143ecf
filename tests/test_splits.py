"""Patient-level splits: nested budgets, one role per patient, stratification, clear errors."""

import csv
from pathlib import Path

import pytest

from stedm.cli import main
from stedm.config import SplitsConfig
from stedm.data.manifest import SlideRecord, read_manifest
from stedm.data.splits import check_splits, make_splits
from stedm.errors import StedmError


def cohort(n_patients=40, two_slide=(), groups=4, fixed=None, unannotated=()):
    records = []
    for i in range(n_patients):
        patient = f"P{i:03d}"
        n = 2 if patient in two_slide else 1
        for k in range(n):
            records.append(
                SlideRecord(
                    slide_id=f"s{i:03d}_{k}",
                    patient_id=patient,
                    slide_path=Path(f"/x/{i}_{k}.tiff"),
                    annotation_path=None if patient in unannotated else Path(f"/x/{i}_{k}.geojson"),
                    group=f"g{i % groups}",
                    split=(fixed or {}).get(patient, ""),
                )
            )
    return records


def test_budgets_nested_and_patient_level():
    records = cohort(two_slide={"P001", "P002"}, fixed={"P001": "test", "P002": "test"})
    splits = make_splits(records, SplitsConfig(budgets=(6, 24), n_val=4, n_test=6, seed=0))
    assert set(splits["budgets"]["6"]) <= set(splits["budgets"]["24"])
    assert len(splits["budgets"]["6"]) == 6 and len(splits["budgets"]["24"]) == 24
    assert splits["budgets"]["24"] == splits["train_pool"][:24]
    roles = {}
    for info in splits["slides"].values():
        roles.setdefault(info["patient_id"], set()).add(info["role"])
    assert all(len(r) == 1 for r in roles.values())
    # the two-slide patients stay together in test
    assert {"s001_0", "s001_1", "s002_0", "s002_1"} <= set(splits["test"])
    test_patients = {splits["slides"][s]["patient_id"] for s in splits["test"]}
    assert len(test_patients) == 6
    val_patients = {splits["slides"][s]["patient_id"] for s in splits["val"]}
    assert len(val_patients) == 4
    all_ids = set(splits["train_pool"]) | set(splits["val"]) | set(splits["test"]) | set(splits["style_pool"])
    assert all_ids == {r.slide_id for r in records}
    assert len(splits["style_pool"]) == 40 - 24 - 6 - 4  # patients left after train, test, val
    check_splits(splits)


def test_budget_is_stratified_by_group():
    splits = make_splits(cohort(groups=3), SplitsConfig(budgets=(6, 24), n_val=3, n_test=3))
    groups = [splits["slides"][s]["group"] for s in splits["budgets"]["6"]]
    assert sorted(groups.count(g) for g in set(groups)) == [2, 2, 2]


def test_deterministic_and_seed_dependent():
    a = make_splits(cohort(), SplitsConfig(seed=1))
    b = make_splits(cohort(), SplitsConfig(seed=1))
    c = make_splits(cohort(), SplitsConfig(seed=2))
    assert a == b and a["train_pool"] != c["train_pool"]


def test_unannotated_patients_go_to_style_pool_only():
    unannotated = {f"P{i:03d}" for i in range(30, 40)}
    splits = make_splits(cohort(unannotated=unannotated), SplitsConfig(budgets=(6, 20)))
    style_patients = {splits["slides"][s]["patient_id"] for s in splits["style_pool"]}
    assert unannotated <= style_patients


def test_patient_in_two_roles_fails():
    records = cohort(two_slide={"P003"})
    records = [r if r.slide_id != "s003_1" else SlideRecord(**{**r.__dict__, "split": "train"}) for r in records]
    records = [r if r.slide_id != "s003_0" else SlideRecord(**{**r.__dict__, "split": "test"}) for r in records]
    with pytest.raises(StedmError, match="P003.*several roles"):
        make_splits(records, SplitsConfig())


def test_too_few_patients_fails_with_fix():
    with pytest.raises(StedmError, match="lower splits.budgets"):
        make_splits(cohort(n_patients=20), SplitsConfig(budgets=(6, 24)))


def test_check_splits_detects_leakage():
    splits = make_splits(cohort(), SplitsConfig())
    slide = splits["test"][0]
    other = splits["train_pool"][0]
    splits["slides"][slide]["patient_id"] = splits["slides"][other]["patient_id"]
    with pytest.raises(StedmError, match="leakage"):
        check_splits(splits)


def _write_manifest(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "slide_path", "annotation_path", "group", "split", "mpp"])
        w.writerows(rows)


def test_cli_writes_splits_and_rejects_duplicates(tmp_path, capsys):
    rows = [[f"s{i}", f"p{i}", f"s{i}.tiff", f"s{i}.geojson", "", "", ""] for i in range(16)]
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, rows)
    out = tmp_path / "splits.json"
    cfg = '{"splits": {"budgets": [2, 6], "n_val": 2, "n_test": 2}}'
    assert main(["split", "--manifest", str(manifest), "--out", str(out), "--config", cfg]) == 0
    assert out.exists()
    _write_manifest(manifest, rows + [rows[0]])
    out2 = tmp_path / "splits2.json"
    assert main(["split", "--manifest", str(manifest), "--out", str(out2), "--config", cfg]) == 1
    assert "duplicate slide_id 's0'" in capsys.readouterr().err
    assert not out2.exists() and not list(tmp_path.glob(".splits2*"))


def test_manifest_relative_paths_and_bad_values(tmp_path):
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, [["a", "p", "slides/a.tiff", "", "g", "", "0.25"]])
    (record,) = read_manifest(manifest)
    assert record.slide_path == tmp_path / "slides/a.tiff" and record.mpp == 0.25
    assert record.annotation_path is None
    _write_manifest(manifest, [["a", "p", "a.tiff", "", "", "holdout", ""]])
    with pytest.raises(StedmError, match="split 'holdout'"):
        read_manifest(manifest)
    _write_manifest(manifest, [["a", "p", "a.tiff", "", "", "", "abc"]])
    with pytest.raises(StedmError, match="mpp 'abc'"):
        read_manifest(manifest)
    with pytest.raises(StedmError, match="does not exist"):
        _write_manifest(manifest, [["a", "p", "a.tiff", "", "", "", ""]])
        read_manifest(manifest, check_files=True)
