"""The cohort manifest: one CSV row per slide, the same format for the demo and your own data.

Columns: `slide_id, patient_id, slide_path, annotation_path, group, split, mpp`. The first three
are required; `annotation_path` may be empty (unannotated slide); `group` is an optional
stratification label (centre, tumour type); `split` optionally fixes a patient's role (`train`,
`val`, `test`, `style`; empty = assigned by `stedm split`); `mpp` overrides µm/px for slides
whose file does not record it. Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from stedm.errors import StedmError

REQUIRED_COLUMNS = ("slide_id", "patient_id", "slide_path")
OPTIONAL_COLUMNS = ("annotation_path", "group", "split", "mpp")
ROLES = ("train", "val", "test", "style")


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    patient_id: str
    slide_path: Path
    annotation_path: Path | None = None
    group: str = ""
    split: str = ""
    mpp: float | None = None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def read_manifest(path: str | Path, *, check_files: bool = False) -> list[SlideRecord]:
    """Read and validate a manifest CSV.

    Args:
        path: the manifest file.
        check_files: also require every slide and annotation file to exist.

    Raises:
        StedmError: missing columns, empty ids, duplicate slide ids, a bad split or mpp value,
            or (with check_files) a missing file; the message names the row and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise StedmError(f"manifest not found: {path} (set cohort.manifest to your CSV file)")
    base = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise StedmError(
                f"{path}: missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}, "
                f"optional: {list(OPTIONAL_COLUMNS)}"
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    records: list[SlideRecord] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        for col in REQUIRED_COLUMNS:
            if not row.get(col):
                raise StedmError(f"{where}: empty '{col}'")
        slide_id = row["slide_id"]
        if slide_id in seen:
            raise StedmError(
                f"{where}: duplicate slide_id '{slide_id}' (first on line {seen[slide_id]}); "
                "slide ids must be unique"
            )
        if any(ch in slide_id for ch in "/\\ ") or slide_id.startswith("."):
            raise StedmError(f"{where}: slide_id '{slide_id}' must not contain '/', '\\' or spaces")
        seen[slide_id] = line
        split = row.get("split", "")
        if split and split not in ROLES:
            raise StedmError(f"{where}: split '{split}' is not one of {list(ROLES)} (or empty)")
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not mpp > 0:
                raise StedmError(f"{where}: mpp '{row['mpp']}' must be a positive number (µm/px)")
        record = SlideRecord(
            slide_id=slide_id,
            patient_id=row["patient_id"],
            slide_path=_resolve(base, row["slide_path"]),
            annotation_path=_resolve(base, row["annotation_path"]) if row.get("annotation_path") else None,
            group=row.get("group", ""),
            split=split,
            mpp=mpp,
        )
        if check_files:
            for label, file in (("slide_path", record.slide_path), ("annotation_path", record.annotation_path)):
                if file is not None and not file.is_file():
                    raise StedmError(f"{where}: {label} {file} does not exist")
        records.append(record)
    if not records:
        raise StedmError(f"{path}: the manifest lists no slides")
    return records


def write_manifest(path: str | Path, records: list[SlideRecord]) -> None:
    """Write records as a manifest CSV with paths relative to the manifest's folder when possible."""
    from stedm.io import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
        for r in records:
            def rel(p: Path | None) -> str:
                if p is None:
                    return ""
                try:
                    return str(Path(p).resolve().relative_to(path.parent.resolve()))
                except ValueError:
                    return str(p)

            writer.writerow(
                [r.slide_id, r.patient_id, rel(r.slide_path), rel(r.annotation_path), r.group, r.split,
                 "" if r.mpp is None else r.mpp]
            )
