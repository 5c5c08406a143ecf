"""`stedm import-catch`: turn the public CATCH release into our manifest + QuPath GeoJSON.

CATCH (CAnine cuTaneous Cancer Histology; Wilm et al., Sci. Data 2022; The Cancer Imaging Archive)
holds 350 H&E `.svs` slides of 282 dogs, 7 tumour types, annotated with 13 region classes.

Verified against the dataset authors' public code (github.com/DeepMicroscopy/CanineCutaneousTumors:
`datasets.csv`, `annotation_conversion/{exact,sql}_to_coco.py`, `coco_to_sql.py`,
`slide/slide_container.py`, `slide/process_slides.py`):
- `CATCH.json` is COCO: `images` (`id`, `file_name` = the `.svs` name, `width`, `height`,
  `license`), `categories` with fixed ids 1-13: Bone, Cartilage, Dermis, Epidermis, Subcutis,
  Inflamm/Necrosis (supercategory Tissue), Melanoma, Plasmacytoma, Mast Cell Tumor, PNST, SCC,
  Trichoblastoma, Histiocytoma (supercategory Tumor), and `annotations` (`image_id`,
  `category_id`, `segmentation`, `bbox`, `area`, `iscrowd` 0).
- `segmentation` is ONE polygon per annotation, written as a *flat* list `[x1, y1, x2, y2, ...]`
  of level-0 pixels (the exterior ring, first point repeated; no holes). We also accept standard
  COCO's list of such lists.
- Annotations are sorted by containment depth (outer first) and the authors' loader paints them in
  file order with `cv2.drawContours`, later on top. So order, not area, decides overlaps.
- `datasets.csv` (in that repository, not on TCIA) is `Slide;Dataset;Scanner`, semicolon
  separated, Dataset in {train, val, test}, split per dog; file names are
  `<Type>_<NN>_<k>.svs` with Type in {Histiocytoma, MCT, Melanoma, PNST, Plasmacytoma, SCC,
  Trichoblastoma}: per type 50 slides = 35 train, 5 val, 10 test (245 / 35 / 70).
Assumed (not checkable offline): slide files may sit in any sub-folder of `--catch-dir` (found
by name, as the authors' loader does with `rglob("*.svs")`); the `.svs` files record their µm/px
(Aperio `MPP`, about 0.25).

What the import writes under `--out-dir`:
- `annotations/<slide_id>.geojson`: one QuPath Feature per COCO annotation, class =
  `properties.classification.name` = the CATCH category name (mapped to your classes at load time
  by `labels.aliases`, so switching between tumour-vs-rest and multi-class needs no re-import).
  Our rasteriser paints larger polygons first; to keep CATCH's file order exactly, each polygon
  has every *later* polygon subtracted from it (shapely), so the features no longer overlap and
  painting order no longer matters. A polygon entirely covered by later ones is dropped (counted).
- `manifest.csv`: `slide_id` = file stem, `patient_id` = `<Type>_<NN>` (the dog), `group` =
  `<Type>`, `split` from datasets.csv: train -> empty (our budgets and the style pool are drawn
  from CATCH's training dogs by `stedm split`), val -> val, test -> test.

`tests/catch_fixture.py` writes a tiny folder in exactly these formats for tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from collections import Counter
from pathlib import Path

import shapely
from shapely.geometry import Polygon, mapping

from stedm.config import load_config
from stedm.data.annotations import clean_polygon, polygonal_part
from stedm.data.manifest import SlideRecord, write_manifest
from stedm.errors import StedmError
from stedm.io import atomic_output

log = logging.getLogger(__name__)

CATEGORIES = {
    1: "Bone",
    2: "Cartilage",
    3: "Dermis",
    4: "Epidermis",
    5: "Subcutis",
    6: "Inflamm/Necrosis",
    7: "Melanoma",
    8: "Plasmacytoma",
    9: "Mast Cell Tumor",
    10: "PNST",
    11: "SCC",
    12: "Trichoblastoma",
    13: "Histiocytoma",
}
TUMOUR_CLASSES = tuple(CATEGORIES[i] for i in range(7, 14))
TISSUE_CLASSES = tuple(CATEGORIES[i] for i in range(1, 7))
# file-name prefix -> the category name of that tumour type
TYPES = {
    "Histiocytoma": "Histiocytoma",
    "MCT": "Mast Cell Tumor",
    "Melanoma": "Melanoma",
    "PNST": "PNST",
    "Plasmacytoma": "Plasmacytoma",
    "SCC": "SCC",
    "Trichoblastoma": "Trichoblastoma",
}
SPLIT_OF = {"train": "", "val": "val", "test": "test"}
NAME = re.compile(r"^(?P<patient>(?P<type>[A-Za-z]+)_(?P<nn>\d+))_(?P<k>\d+)$")
MIN_PART_AREA = 1.0  # level-0 px²: slivers left by subtracting shared edges are dropped


def parse_slide_name(file_name: str) -> tuple[str, str]:
    """(patient_id, group) of a CATCH file name `<Type>_<NN>_<k>.svs`; (stem, "") otherwise."""
    stem = Path(file_name).stem
    match = NAME.match(stem)
    return (match["patient"], match["type"]) if match else (stem, "")


def read_datasets_csv(path: Path) -> dict[str, str]:
    """Slide file name -> train/val/test from CATCH's `datasets.csv` (`Slide;Dataset;Scanner`)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    if not rows or not {"Slide", "Dataset"} <= set(rows[0]):
        raise StedmError(
            f"{path}: expected the columns Slide;Dataset;Scanner (semicolon-separated)"
        )
    bad = sorted({r["Dataset"] for r in rows} - set(SPLIT_OF))
    if bad:
        raise StedmError(f"{path}: Dataset values {bad} are not one of {sorted(SPLIT_OF)}")
    return {r["Slide"].strip(): r["Dataset"].strip() for r in rows}


def _rings(segmentation: list) -> list[list[tuple[float, float]]]:
    """CATCH's flat [x1, y1, ...] polygon, or COCO's list of such lists, as point lists."""
    flat = (
        [segmentation] if segmentation and not isinstance(segmentation[0], list) else segmentation
    )
    return [list(zip(ring[0::2], ring[1::2], strict=False)) for ring in flat]


def coco_to_features(
    annotations: list[dict], categories: dict[int, str]
) -> tuple[list[dict], Counter]:
    """QuPath Features of one slide's COCO annotations, made disjoint so file order is kept.

    Returns:
        (features, counts): counts has `repaired` (invalid polygons made valid), `covered`
        (annotations entirely painted over by later ones) and `empty` (no usable polygon).
    """
    counts: Counter[str] = Counter()
    geoms, kept = [], []
    for annotation in annotations:
        parts = [Polygon(r) for r in _rings(annotation.get("segmentation") or []) if len(r) >= 3]
        geometry, repaired, _ = clean_polygon(shapely.union_all(parts) if parts else Polygon())
        if geometry is None:
            counts["empty"] += 1
            continue
        counts["repaired"] += repaired
        geoms.append(geometry)
        kept.append(annotation)
    tree = shapely.STRtree(geoms) if geoms else None
    features = []
    for i, (geometry, annotation) in enumerate(zip(geoms, kept, strict=True)):
        later = [j for j in tree.query(geometry, predicate="intersects") if j > i]
        if later:  # later annotations are painted on top: cut them out of this one
            geometry = polygonal_part(
                geometry.difference(shapely.union_all([geoms[j] for j in later]))
            )
            parts = [p for p in shapely.get_parts(geometry) if p.area >= MIN_PART_AREA]
            geometry = shapely.union_all(parts) if parts else Polygon()
        if geometry.is_empty:
            counts["covered"] += 1
            continue
        features.append(
            {
                "type": "Feature",
                "geometry": mapping(geometry),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": categories[annotation["category_id"]]},
                    "coco": {"id": annotation.get("id"), "category_id": annotation["category_id"]},
                },
            }
        )
    return features, counts


def import_catch(
    catch_dir: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    allow_missing: bool = False,
) -> list[SlideRecord]:
    """Write `<out_dir>/manifest.csv` and `<out_dir>/annotations/*.geojson` (module docstring).

    Args:
        catch_dir: folder holding `CATCH.json`, `datasets.csv` and the `.svs` files (any depth).
        out_dir: output folder.
        config: if given, every CATCH class must map to its `labels` (checked before writing).
        allow_missing: import only the slides present instead of failing when some are missing.

    Raises:
        StedmError: a missing input file, a slide listed but not found, a malformed CATCH.json or
            datasets.csv, or a CATCH class the config does not map.
    """
    catch_dir, out_dir = Path(catch_dir), Path(out_dir)
    coco_path, split_path = catch_dir / "CATCH.json", catch_dir / "datasets.csv"
    for path in (coco_path, split_path):
        if not path.is_file():
            raise StedmError(
                f"{path} not found; download CATCH.json (TCIA) and datasets.csv "
                f"(github.com/DeepMicroscopy/CanineCutaneousTumors) into {catch_dir}"
            )
    try:
        coco = json.loads(coco_path.read_text())
        categories = {int(c["id"]): c["name"] for c in coco["categories"]}
        images = {int(im["id"]): im for im in coco["images"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StedmError(
            f"{coco_path}: not a COCO file with images and categories ({exc})"
        ) from exc
    if config is not None:
        labels = load_config(config).labels
        unmapped = [n for n in categories.values() if labels.class_index(n) is None]
        if unmapped:
            raise StedmError(
                f"CATCH classes {unmapped} are not mapped by labels in {config}; add "
                "them to labels.classes or labels.aliases (see configs/catch.yaml)"
            )
    splits = read_datasets_csv(split_path)
    files = {p.name: p for p in sorted(catch_dir.rglob("*.svs"))}
    missing = sorted(im["file_name"] for im in images.values() if im["file_name"] not in files)
    if missing and not allow_missing:
        raise StedmError(
            f"{len(missing)} of {len(images)} slides in {coco_path} are not under "
            f"{catch_dir} (e.g. {missing[:3]}); download them, or pass --allow-missing"
        )
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for annotation in coco.get("annotations", []):
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    records, totals = [], Counter()
    for image_id, image in sorted(images.items(), key=lambda kv: kv[1]["file_name"]):
        name = image["file_name"]
        if name not in files:
            continue
        features, counts = coco_to_features(by_image.get(image_id, []), categories)
        totals.update(counts)
        totals["features"] += len(features)
        slide_id = Path(name).stem
        geojson = out_dir / "annotations" / f"{slide_id}.geojson"
        with atomic_output(geojson) as tmp:
            tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        patient, group = parse_slide_name(name)
        if name not in splits:
            log.warning("%s is not in %s: its split is left to `stedm split`", name, split_path)
        records.append(
            SlideRecord(
                slide_id=slide_id,
                patient_id=patient,
                slide_path=files[name].resolve(),
                annotation_path=geojson,
                group=group,
                split=SPLIT_OF[splits.get(name, "train")],
            )
        )
    if not records:
        raise StedmError(f"no CATCH slide found under {catch_dir}")
    write_manifest(out_dir / "manifest.csv", records)
    roles = Counter(r.split or "train (auto)" for r in records)
    log.info(
        "wrote %s: %d slides of %d dogs %s; %d features (%d repaired, %d painted over by "
        "later annotations, %d empty)",
        out_dir / "manifest.csv",
        len(records),
        len({r.patient_id for r in records}),
        dict(roles),
        totals["features"],
        totals["repaired"],
        totals["covered"],
        totals["empty"],
    )
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catch-dir",
        required=True,
        type=Path,
        help="folder with CATCH.json, datasets.csv and the .svs slides",
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        type=Path,
        help="writes manifest.csv and annotations/ here (e.g. data/catch)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="config whose labels must map every CATCH class (configs/catch.yaml)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="import the slides present instead of failing on missing ones",
    )


def run(args: argparse.Namespace) -> None:
    import_catch(args.catch_dir, args.out_dir, args.config, args.allow_missing)
