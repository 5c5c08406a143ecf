"""`stedm make-demo-cohort`: a synthetic multi-centre H&E cohort, so the workflow runs offline.

What it writes under `--out-dir`:
- `slides/<slide_id>.tiff`: pyramidal generic TIFFs (JPEG tiles, 3 levels, µm/px in the tags);
- `annotations/<slide_id>.geojson`: QuPath-style GeoJSON, one Tumor and one Stroma feature per
  slide, (Multi)Polygons with holes in level-0 pixel coordinates; glass is unannotated;
- `manifest.csv`: one row per slide (`group` = staining centre), written last.

How a slide is made: a layout (tissue blob(s), tumour regions inside them) is drawn from smooth
random fields and turned into polygons; the polygons — not the fields — are rasterised (with the
label tiles' convention) and the textures painted into them, so image and annotation agree pixel
for pixel. Textures are stain *concentrations* (tumour: dense, large, pleomorphic hematoxylin
nuclei in pale cytoplasm; stroma: wavy eosin fibres with sparse small elongated nuclei), rendered
to RGB with a patient-specific stain style: centre style (clearly different per centre) + patient
jitter + small slide jitter (two sections of one patient look alike). All follows from the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stedm.config import Config, DemoCohortConfig, load_config
from stedm.data.demo_layout import CLASS_COLORS, feature_collection, make_layout
from stedm.data.demo_render import StainStyle, render_slide
from stedm.data.manifest import SlideRecord, write_manifest
from stedm.data.stain import RGB_FROM_HED, perturb_stain_matrix
from stedm.data.tiff import write_pyramidal_tiff
from stedm.errors import StedmError
from stedm.io import atomic_output

log = logging.getLogger(__name__)

# Stain-style spread: centres sit on a circle in (log H scale, log E scale) so that every centre is
# clearly different; patients and sections add progressively smaller jitter around their centre.
CENTRE_RADIUS, PATIENT_SIGMA, SECTION_SIGMA = 0.45, 0.06, 0.02


@dataclass(frozen=True)
class DemoSlide:
    """One planned slide; cheap to compute, enough to render it deterministically."""

    slide_id: str
    patient_id: str
    group: str  # staining centre, e.g. "centre_A"
    split: str  # "test" for the two-slide patients, else "" (assigned later by `stedm split`)
    seed: int  # slide seed: layout, textures, section jitter
    patient_seed: int  # patient stain style (shared by a patient's sections)
    centre: int  # centre index
    section: int  # 0, or 1 for a patient's second slide


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


def plan_demo_cohort(cfg: DemoCohortConfig) -> list[DemoSlide]:
    """Slides, patients, centres and fixed test patients of the demo cohort (no images)."""
    k = cfg.n_two_slide_patients
    if 2 * k > cfg.n_slides:
        raise StedmError(
            f"config key 'cohort.demo.n_two_slide_patients': {k} two-slide patients need "
            f"{2 * k} slides but cohort.demo.n_slides is {cfg.n_slides}"
        )
    n_patients = cfg.n_slides - k
    rng = np.random.default_rng(_seed(cfg.seed, 0))
    centres = rng.permutation(np.arange(n_patients) % cfg.n_centres)
    # two-slide patients cycle through the centres, so the fixed test set spans several centres
    by_centre = [list(rng.permutation(np.flatnonzero(centres == c))) for c in range(cfg.n_centres)]
    two_slide: set[int] = set()
    c = 0
    while len(two_slide) < k:
        if by_centre[c % cfg.n_centres]:
            two_slide.add(int(by_centre[c % cfg.n_centres].pop()))
        c += 1
    width = max(3, len(str(cfg.n_slides)))
    slides: list[DemoSlide] = []
    for p in range(n_patients):
        for section in range(2 if p in two_slide else 1):
            i = len(slides)
            slides.append(
                DemoSlide(
                    slide_id=f"demo_{i + 1:0{width}d}",
                    patient_id=f"P{p + 1:0{width}d}",
                    group=_centre_name(int(centres[p]), cfg.n_centres),
                    split="test" if p in two_slide else "",
                    seed=_seed(cfg.seed, 1, i),
                    patient_seed=_seed(cfg.seed, 2, p),
                    centre=int(centres[p]),
                    section=section,
                )
            )
    return slides


def demo_slide_ids(cfg: DemoCohortConfig) -> list[str]:
    """Slide ids of the demo cohort, without generating anything (for the Snakefile)."""
    return [s.slide_id for s in plan_demo_cohort(cfg)]


def _centre_name(c: int, n: int) -> str:
    return f"centre_{string.ascii_uppercase[c]}" if n <= 26 else f"centre_{c + 1:02d}"


# --------------------------------------------------------------------------- stain style


def _jitter(style: StainStyle, rng: np.random.Generator, sigma: float) -> StainStyle:
    return StainStyle(
        matrix=tuple(map(tuple, perturb_stain_matrix(np.array(style.matrix), rng, sigma / 3))),
        h_scale=style.h_scale * float(np.exp(rng.normal(0, sigma))),
        e_scale=style.e_scale * float(np.exp(rng.normal(0, sigma))),
        background=tuple(
            float(np.clip(b + rng.normal(0, 40 * sigma), 200, 255)) for b in style.background
        ),
        blur=float(max(0.0, style.blur + rng.normal(0, 2 * sigma))),
    )


def stain_style(slide: DemoSlide, cfg: DemoCohortConfig) -> StainStyle:
    """The slide's stain style: centre style, then patient jitter, then section jitter."""
    offset = np.random.default_rng(_seed(cfg.seed, 3)).uniform(0, 2 * np.pi)
    rng = np.random.default_rng(_seed(cfg.seed, 4, slide.centre))
    angle = offset + 2 * np.pi * slide.centre / cfg.n_centres + rng.uniform(-0.25, 0.25)
    centre = StainStyle(
        matrix=tuple(map(tuple, perturb_stain_matrix(RGB_FROM_HED, rng, 0.07))),
        h_scale=float(np.exp(CENTRE_RADIUS * np.cos(angle))),
        e_scale=float(np.exp(CENTRE_RADIUS * np.sin(angle))),
        background=tuple(float(v) for v in 252 - rng.uniform(0, 12, size=3)),
        blur=float(rng.uniform(0.3, 1.3)),
    )
    patient = _jitter(centre, np.random.default_rng(slide.patient_seed), PATIENT_SIGMA)
    return _jitter(patient, np.random.default_rng(_seed(slide.seed, 5)), SECTION_SIGMA)


def generate_demo_slide(slide: DemoSlide, cfg: DemoCohortConfig) -> tuple[np.ndarray, dict, dict]:
    """Render one planned slide: (level-0 RGB, GeoJSON FeatureCollection, statistics)."""
    rng = np.random.default_rng(slide.seed)
    layout = make_layout(rng, cfg.size_px)
    geojson = feature_collection(layout, np.random.default_rng(_seed(slide.seed, 6)))
    rgb, stats = render_slide(layout, stain_style(slide, cfg), cfg, rng)
    return rgb, geojson, stats


# --------------------------------------------------------------------------- cohort + CLI


def _write_slide(job: tuple[DemoSlide, DemoCohortConfig, Path]) -> dict:
    slide, cfg, out_dir = job
    rgb, geojson, stats = generate_demo_slide(slide, cfg)
    write_pyramidal_tiff(out_dir / "slides" / f"{slide.slide_id}.tiff", rgb, cfg.mpp, n_levels=3)
    with atomic_output(out_dir / "annotations" / f"{slide.slide_id}.geojson") as tmp:
        tmp.write_text(json.dumps(geojson) + "\n")
    return stats


def make_demo_cohort(config: Config, out_dir: Path, workers: int = 1) -> Path:
    """Write the demo cohort's slides, annotations and (last) manifest; return the manifest path."""
    cfg, out_dir = config.cohort.demo, Path(out_dir)
    for name in CLASS_COLORS:
        if config.labels.class_index(name) is None:
            log.warning(
                "demo annotation class '%s' is not in labels.classes %s (nor an alias)",
                name,
                list(config.labels.classes),
            )
    slides = plan_demo_cohort(cfg)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    jobs = [(s, cfg, out_dir) for s in slides]
    start = time.perf_counter()
    progress = dict(total=len(jobs), desc="demo slides", unit="slide")
    if workers > 1:
        # fork on Linux: workers inherit the imported modules instead of re-importing them
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
            stats = list(tqdm(pool.imap(_write_slide, jobs), **progress))
    else:
        stats = [_write_slide(job) for job in tqdm(jobs, **progress)]
    records = [
        SlideRecord(
            slide_id=s.slide_id,
            patient_id=s.patient_id,
            slide_path=out_dir / "slides" / f"{s.slide_id}.tiff",
            annotation_path=out_dir / "annotations" / f"{s.slide_id}.geojson",
            group=s.group,
            split=s.split,
        )
        for s in slides
    ]
    manifest = out_dir / "manifest.csv"
    write_manifest(manifest, records)
    log.info(
        "wrote %d slides (%d patients, %d centres, %d px at %.3g µm/px; tumour %.0f %%, stroma "
        "%.0f %% of the area) with annotations and %s in %.1f s",
        len(slides),
        len({s.patient_id for s in slides}),
        cfg.n_centres,
        cfg.size_px,
        cfg.mpp,
        100 * np.mean([s["tumour_fraction"] for s in stats]),
        100 * np.mean([s["stroma_fraction"] for s in stats]),
        manifest,
        time.perf_counter() - start,
    )
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="config YAML/JSON file or inline JSON (default: built-in defaults)",
    )
    parser.add_argument(
        "--out-dir",
        required=True,
        type=Path,
        help="folder for slides/, annotations/ and manifest.csv",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")


def run(args: argparse.Namespace) -> None:
    make_demo_cohort(load_config(args.config), args.out_dir, workers=max(1, args.workers))
