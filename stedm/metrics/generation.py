"""`stedm evaluate-generation`: FID/IS, style fidelity and layout fidelity of one budget's synthetic set.

    stedm evaluate-generation --budget 6 --synthetic results/synthesis/budget~6/synthetic.zarr \\
        --splits results/splits/splits.json --tiles-dir results/tiles \\
        --seg-model results/segmentation/budget~24/arm~real/seed~0/model \\
        --config cfg.json --out results/metrics/generation/budget~6.json

- FID/IS (`fid`): the synthetic images against held-out real tiles (validation + test slides,
  never training tiles), equal counts capped at `report.fid_max_images`; "not computed" without
  local Inception weights.
- Style fidelity (`style_fidelity`): nearest style slide by stain statistics, over the style
  pool (plus any style slide the set used).
- Layout fidelity (`layout_fidelity`): the real-arm segmentation model of the largest budget
  (`--seg-model`) on the synthetic images against their layouts; "not computed" without it.

Output JSON keys: `budget`, `style` (style_sampling, aggregation, n_style: one row of the
generation table, so runs with other style settings concatenate), `synthetic` (path, n_samples,
tile_size, mpp, sampling), `reference` (slides and tile count of the real FID set), `fid_is`,
`style_fidelity`, `layout_fidelity` (each with `status` and, when not computed, `reason`),
`seconds`. `--figure` writes the style confusion matrix and the layout Dice histogram. One MLflow
run under the parent `budget~<b>/seed~<first seed>`.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stedm.config import Config
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json, write_json
from stedm.metrics import ReportConfig, load_stage_config
from stedm.metrics.fid import Batches, array_batches, generation_quality, not_computed
from stedm.metrics.layout_fidelity import layout_fidelity, load_segmenter
from stedm.metrics.style_fidelity import style_fidelity
from stedm.tracking import start_run

log = logging.getLogger(__name__)

PROVENANCE_CSV = "provenance.csv"
STEDM_RUN_FILE = "stedm_run.json"  # stedm.diffusion.train.RUN_FILE (not imported: pulls diffusers)


@dataclass
class SyntheticSet:
    """A merged synthetic store (`stedm merge-synthetic`) as the metrics see it."""

    path: Path
    images: Any  # (N, T, T, 3) uint8 zarr array
    labels: Any  # (N, T, T) uint8 zarr array
    style_slides: list[str]  # per sample; "" = no style
    strategies: list[str]  # per sample; "" when unrecorded
    attrs: dict[str, Any]
    has_style_provenance: bool = True  # False: the store records no per-sample style slide
    style_tiles: list[str] | None = None  # per sample, ";"-joined tile indices of its style set

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _column(group: zarr.Group, path: Path, name: str, n: int) -> list[str] | None:
    """A per-sample provenance column: a zarr array in the store, else `provenance.csv` in it."""
    if name in group.array_keys():
        return ["" if v is None else str(v) for v in np.asarray(group[name][:]).tolist()]
    table = path / PROVENANCE_CSV
    if table.is_file():
        with open(table, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if len(rows) == n and name in rows[0]:
            return [r[name] or "" for r in rows]
    return None


def read_synthetic(path: str | Path) -> SyntheticSet:
    """Open a synthetic store; the one place that knows its layout (docstring of `synthesis.generate`)."""
    path = Path(path)
    if not path.is_dir():
        raise StedmError(f"synthetic store not found: {path}; run `stedm merge-synthetic`")
    group = zarr.open_group(str(path), mode="r")
    images, labels = group["images"], group["labels"]
    n = int(images.shape[0])
    styles, strategies = _column(group, path, "style_slide", n), _column(group, path, "strategy", n)
    return SyntheticSet(path, images, labels, styles or [""] * n, strategies or [""] * n, dict(group.attrs),
                        has_style_provenance=styles is not None,
                        style_tiles=_column(group, path, "style_tiles", n))


def _tile_arrays(tiles_dir: Path, slides: list[str], key: str = "images") -> dict[str, Any]:
    """slide -> its tile store's `key` array, for slides whose store has it."""
    out = {}
    for slide in slides:
        path = tiles_dir / f"{slide}.zarr"
        if not path.is_dir():
            raise StedmError(f"tile store missing: {path}; run the tiling stage")
        group = zarr.open_group(str(path), mode="r")
        if key in group.array_keys() and group[key].shape[0]:
            out[slide] = group[key]
    return out


def pooled_batches(arrays: dict[str, Any], picks: list[tuple[str, int]], batch_size: int) -> Batches:
    """Batches over (slide, tile) picks from several tile stores."""

    def gen():
        for lo in range(0, len(picks), batch_size):
            yield np.stack([np.asarray(arrays[s][i]) for s, i in picks[lo : lo + batch_size]])

    return gen


def sample_tiles(arrays: dict[str, Any], n: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """n (slide, tile) picks uniformly over all tiles of the stores (sorted, for sequential reads)."""
    pool = [(s, i) for s in sorted(arrays) for i in range(arrays[s].shape[0])]
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False) if pool else []
    return [pool[int(k)] for k in np.sort(picks)]


def style_setting(config: Config, syn: SyntheticSet) -> dict[str, Any]:
    """The style columns of the generation table: sampling and style-set size at generation (from the
    store's provenance where recorded), the aggregation the model was trained with."""
    stedm = dict(config.section("stedm"))
    model_path = (syn.attrs.get("model") or {}).get("path")
    run_file = Path(model_path) / STEDM_RUN_FILE if model_path else None
    if run_file is not None and run_file.is_file():
        stedm.update(read_json(run_file).get("config", {}).get("stedm", {}))
    counts = collections.Counter(s for s in syn.strategies if s)
    sampling = (counts.most_common(1)[0][0] if counts
                else config.synthesis.style_sampling or stedm["style_sampling"])
    sizes = collections.Counter(len(t.split(";")) for t in syn.style_tiles or [] if t)
    n_style = sizes.most_common(1)[0][0] if sizes else config.synthesis.n_style or stedm["n_style"]
    return {"style_sampling": sampling, "aggregation": stedm["aggregation"], "n_style": n_style,
            "trained_style_sampling": stedm["style_sampling"]}


def evaluate_generation(config: Config, report: ReportConfig, *, budget: int, synthetic: Path,
                        splits: dict[str, Any], tiles_dir: Path, seg_model: Path | None) -> dict[str, Any]:
    """All generation metrics of one synthetic set as the output dict (see the module docstring)."""
    start = time.perf_counter()
    syn = read_synthetic(synthetic)
    n_syn = len(syn)
    rng = np.random.default_rng(config.seed)
    tile = int(syn.attrs.get("tile_size", syn.images.shape[1]))
    ref_slides = sorted(set(splits.get("val", [])) | set(splits.get("test", [])))
    ref_images = _tile_arrays(tiles_dir, ref_slides)
    n_ref = sum(int(a.shape[0]) for a in ref_images.values())

    # FID / IS: equal counts; the synthetic subset evenly spaced (samples are ordered by layout draw)
    n = min(report.fid_max_images, n_syn, n_ref)
    if n < 2:
        fid_is = not_computed(f"too few images: {n_syn} synthetic, {n_ref} held-out real tiles")
    else:
        fake_idx = np.unique(np.linspace(0, n_syn - 1, n).round().astype(int))
        real_picks = sample_tiles(ref_images, len(fake_idx), rng)
        fid_is = generation_quality(
            pooled_batches(ref_images, real_picks, report.fid_batch_size),
            array_batches(syn.images, fake_idx, report.fid_batch_size),
            n_images=len(fake_idx), tile_size=tile, weights=report.inception_weights,
        )

    # style fidelity over the style pool and every style slide actually used
    candidates = sorted(set(splits.get("style_pool", [])) | {s for s in syn.style_slides if s})
    if not syn.has_style_provenance:
        style = not_computed(f"{synthetic} records no per-sample style slide (`style_slide`)")
    else:
        style = style_fidelity(syn.images, syn.style_slides, _tile_arrays(tiles_dir, candidates),
                               max_images=report.style_max_images,
                               tiles_per_slide=report.style_tiles_per_slide, seed=config.seed)

    # layout fidelity with the largest budget's real-arm model
    if seg_model is None or not Path(seg_model).is_dir():
        layout = not_computed("no real-arm model for the largest budget")
    else:
        labels = config.labels
        classes = list(syn.attrs.get("class_names", labels.classes))
        if classes != list(labels.classes):
            raise StedmError(f"{synthetic} has classes {classes}, the config {list(labels.classes)}")
        k = min(report.layout_max_images, n_syn)
        idx = np.unique(np.linspace(0, n_syn - 1, k).round().astype(int))
        ref_labels = _tile_arrays(tiles_dir, ref_slides, "labels")
        picks = sample_tiles({s: ref_images[s] for s in ref_labels if s in ref_images}, k, rng)
        by_slide = collections.defaultdict(list)
        for s, i in picks:
            by_slide[s].append(i)
        reference = [(ref_images[s], ref_labels[s], ii) for s, ii in by_slide.items()]
        layout = layout_fidelity(load_segmenter(seg_model), syn.images, syn.labels, idx,
                                 foreground=labels.foreground_indices, ignore_index=labels.ignore_index,
                                 reference=reference)
        layout["model"] = str(seg_model)

    return {
        "budget": int(budget),
        "style": style_setting(config, syn),
        "synthetic": {"path": str(synthetic), "n_samples": n_syn, "tile_size": tile,
                      "mpp": syn.attrs.get("mpp"), "sampling": syn.attrs.get("sampling")},
        "reference": {"slides": sorted(ref_images), "n_tiles": n_ref, "role": "val + test slides"},
        "fid_is": fid_is,
        "style_fidelity": style,
        "layout_fidelity": layout,
        "seconds": time.perf_counter() - start,
    }


def plot_generation(result: dict[str, Any], path: Path) -> None:
    """Style confusion matrix (style slide -> nearest slide) and per-image layout Dice histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    style, layout = result["style_fidelity"], result["layout_fidelity"]
    if style["status"] == "computed":
        conf = np.asarray(style["confusion"], dtype=float)
        rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        ax1.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        names = style["slides"]
        ax1.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax1.set_yticks(range(len(names)), names, fontsize=6)
        ax1.set_xlabel("nearest real slide (stain statistics)")
        ax1.set_ylabel("style slide it was generated from")
        ax1.set_title(f"style fidelity: top-1 {style['top1']:.2f} (chance {style['chance']:.2f})")
    else:
        ax1.axis("off")
        ax1.text(0.5, 0.5, f"style fidelity not computed:\n{style['reason']}", ha="center", wrap=True)
    if layout["status"] == "computed":
        scores = [s for s in layout["per_image_dice"] if s is not None]
        ax2.hist(scores, bins=20, range=(0, 1), color="C0", alpha=0.8, label="synthetic vs layout")
        ref = layout.get("real_reference") or {}
        if ref.get("dice_mean") is not None:
            ax2.axvline(ref["dice_mean"], color="C3", ls="--", label=f"real tiles mean {ref['dice_mean']:.2f}")
        ax2.set_xlabel("Dice (segmentation of the image vs its layout)")
        ax2.set_ylabel("images")
        ax2.legend(fontsize=8)
        mean = layout["dice_mean"]
        ax2.set_title("layout fidelity: mean Dice " + ("n/a" if mean is None else f"{mean:.2f}"))
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, f"layout fidelity not computed:\n{layout['reason']}", ha="center", wrap=True)
    fig.suptitle(f"budget {result['budget']}: {result['style']['style_sampling']} / "
                 f"{result['style']['aggregation']}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers logged to MLflow (only computed ones)."""
    out = {}
    for prefix, section, keys in (
        ("", "fid_is", ("fid", "is_mean", "is_std", "is_real_mean")),
        ("style_", "style_fidelity", ("top1", "chance", "mean_own_distance", "mean_other_distance",
                                      "real_tiles_top1")),
        ("layout_", "layout_fidelity", ("dice_mean", "dice_pooled")),
    ):
        block = result[section]
        for key in keys:
            if block.get("status") == "computed" and isinstance(block.get(key), int | float):
                out[prefix + key] = float(block[key])
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", required=True, type=int, help="annotation budget of the synthetic set")
    parser.add_argument("--synthetic", required=True, type=Path, help="synthetic.zarr of that budget")
    parser.add_argument("--splits", required=True, type=Path, help="splits.json")
    parser.add_argument("--tiles-dir", required=True, type=Path, help="folder of <slide>.zarr tile stores")
    parser.add_argument("--seg-model", type=Path, default=None,
                        help="real-arm segmentation model of the largest budget (layout fidelity)")
    parser.add_argument("--preview", type=Path, default=None, help="preview.png (logged to MLflow)")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")
    parser.add_argument("--out", required=True, type=Path, help="metrics JSON to write")
    parser.add_argument("--figure", type=Path, default=None, help="PNG: style confusion + layout Dice")


def run(args: argparse.Namespace) -> None:
    config, report = load_stage_config(args.config)
    params = {"budget": args.budget, "report": dataclasses.asdict(report), "synthesis": config.section("synthesis"),
              "stedm": config.section("stedm")}
    parent = f"budget~{args.budget}/seed~{config.segmentation.seeds[0]}"
    with start_run(config, f"evaluate_generation budget~{args.budget}", params=params, parent=parent) as run_:
        result = evaluate_generation(config, report, budget=args.budget, synthetic=args.synthetic,
                                     splits=read_json(args.splits), tiles_dir=args.tiles_dir,
                                     seg_model=args.seg_model)
        write_json(args.out, result)
        if args.figure is not None:
            plot_generation(result, args.figure)
        run_.log_metrics(flat_metrics(result))
        run_.set_tags({f"{k}_status": str(result[k]["status"])
                       for k in ("fid_is", "style_fidelity", "layout_fidelity")})
        for path in (args.out, args.figure, args.preview):
            if path is not None:
                run_.log_artifact(path)
    for key in ("fid_is", "style_fidelity", "layout_fidelity"):
        block = result[key]
        log.info("%s: %s%s", key, block["status"], f" ({block['reason']})" if "reason" in block else "")
    log.info("wrote %s", args.out)
