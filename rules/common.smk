# Shared helpers: the typed config, the slide list, and how rules pass config sections on.
import json
import shlex

from stedm.config import load_config
from stedm.data.manifest import read_manifest

CFG = load_config(config)  # semantic checks beyond the schema, typed access
R = CFG.results_dir
BUDGETS = sorted(set(CFG.splits.budgets))
TRACKING = f"{R}/tracking.json"
SPLITS = f"{R}/splits/splits.json"

if CFG.cohort.source == "demo":
    from stedm.data.demo import demo_slide_ids

    MANIFEST = f"{R}/cohort/manifest.csv"
    SLIDES = demo_slide_ids(CFG.cohort.demo)
else:
    MANIFEST = CFG.cohort.manifest
    _RECORDS = {r.slide_id: r for r in read_manifest(MANIFEST)}
    SLIDES = list(_RECORDS)


def cfg_json(*sections):
    """The named config sections as one shell-quoted JSON argument (`--config {params.cfg}`).

    Passing sections through `params` makes a config change rerun exactly the jobs that use it.
    """
    return shlex.quote(json.dumps({s: config[s] for s in sections}))  # config order: arms stay in order


def slide_inputs(wildcards):
    """The slide (and annotation) files of one slide: reruns its tiling when they change."""
    if CFG.cohort.source == "demo":
        return [
            MANIFEST,
            f"{R}/cohort/slides/{wildcards.slide}.tiff",
            f"{R}/cohort/annotations/{wildcards.slide}.geojson",
        ]
    record = _RECORDS[wildcards.slide]
    files = [MANIFEST, str(record.slide_path)]
    if record.annotation_path is not None:
        files.append(str(record.annotation_path))
        if record.annotation_path.suffix.lower() in {".png", ".tif", ".tiff"}:
            files.append(str(record.annotation_path.with_suffix(".json")))  # label-mask sidecar
    return files


def all_tile_stores(wildcards=None):
    """Every slide's tile store (stages pick their slides from splits.json at run time)."""
    return expand(f"{R}/tiles/{{slide}}.zarr", slide=SLIDES)
