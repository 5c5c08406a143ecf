"""`stedm generate`: synthetic (image, label) tiles from a trained STEDM model.

Two modes share one sampling path (`stedm.synthesis.sampling.synthesize`):

**Workflow mode** (rule `generate_synthetic`, one job per shard): renders the rows of a
style-query table (`stedm select-styles`) into a zarr store, then `stedm merge-synthetic` joins
the shards into `<results>/synthesis/budget~<b>/synthetic.zarr` and draws `preview.png`.

    stedm generate --budget 6 --queries style_queries.csv --tiles-dir results/tiles \\
        --model results/stedm/budget~6/model --shard 0 --config cfg.yaml --out shard~0.zarr

Rows are processed in fixed global micro-batches of `synthesis.batch_size` and shard k of K
takes micro-batches [k*M/K, (k+1)*M/K) of the M in total; every sample's initial noise comes from
its own seed. So the merged output of K shards equals the unsharded output bit for bit (on the
CPU, and on one GPU with deterministic kernels).

Shard/merged store (zarr v3 group):

| array | dtype | shape | meaning |
|---|---|---|---|
| `images` | uint8 | (N, T, T, 3) | generated RGB tiles |
| `labels` | uint8 | (N, T, T) | the (augmented) label tile whose layout conditioned the image; class indices and `ignore_index` as in the tile stores |
| every style-query column | int64 / float64 / string | (N,) | `sample_id`, `layout_slide`, `layout_tile`, `rot90`, `flip`, `affine*`, `style_slide`, `style_tiles`, `strategy`, `seed`, ... |
| `sampler`, `steps`, `guidance_scale`, `guidance_rescale` | string / int / float | (N,) | how each sample was drawn |

Attributes: `budget`, `model` (dir, sha256), `autoencoder` (path, sha256), `sampling`, `mpp`,
`tile_size`, `class_names`, `ignore_index`, `layout`, `n_samples`, `stedm_version` (shards also
`shard`, `n_shards`, `rows`, `device`).

**User mode** (`--layout` or `--layout-geojson`): a layout of your own in the style of any slide;
see `stedm.synthesis.user` for the options and the output folder.

    stedm generate --model DIR --layout labels.png --style-slide slide.svs --n 4 --out out/
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

import stedm
from stedm.config import Config, load_config
from stedm.diffusion.data import (
    _StoreReader,
    dihedral,
    layout_onehot,
    random_dihedral,
    to_model_image,
)
from stedm.diffusion.train import RUN_FILE
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json, sha256_file
from stedm.models.autoencoder import Autoencoder, load_autoencoder
from stedm.models.stedm import WEIGHTS_NAME, StedmModel
from stedm.synthesis.sampling import SamplingSettings, synthesize
from stedm.synthesis.select import StyleQuery, augment_layout, read_queries

log = logging.getLogger(__name__)

SHARD_ATTRS = ("shard", "n_shards", "rows", "device")  # differ between shards / runs


# --------------------------------------------------------------------------- the trained generator
@dataclass
class Generator:
    """A trained STEDM model with its autoencoder and the run config it was trained with."""

    model: StedmModel
    ae: Autoencoder
    config: Config  # labels, tiling, stedm (and seed) of the training run
    model_dir: Path
    model_sha256: str
    ae_dir: Path
    ae_sha256: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def onehot(self, labels: np.ndarray) -> torch.Tensor:
        """(B, T, T) label tiles -> (B, L, T, T) float32 layout condition, as in training."""
        lab = self.config.labels
        return torch.from_numpy(
            np.stack(
                [
                    layout_onehot(
                        x,
                        self.model.config.layout,
                        lab.foreground_indices,
                        len(lab.classes),
                        lab.ignore_index,
                    )
                    for x in labels
                ]
            )
        )

    def attrs(self) -> dict[str, Any]:
        lab, tiling = self.config.labels, self.config.tiling
        return {
            "model": {"path": str(self.model_dir.resolve()), "sha256": self.model_sha256},
            "autoencoder": {"path": str(self.ae_dir.resolve()), "sha256": self.ae_sha256},
            "mpp": tiling.mpp,
            "tile_size": tiling.tile_size,
            "class_names": list(lab.classes),
            "ignore_index": lab.ignore_index,
            "layout": self.model.config.layout,
            "stedm_version": stedm.__version__,
        }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_generator(
    model_dir: Path, autoencoder: Path | None = None, device: str | None = None
) -> Generator:
    """Load a `train-stedm` output (EMA weights) and the autoencoder recorded in its run file.

    Raises:
        StedmError: no run file, or an autoencoder whose weights differ from the training run's.
    """
    model_dir = Path(model_dir)
    run_file = model_dir / RUN_FILE
    if not run_file.is_file():
        raise StedmError(f"{model_dir} has no {RUN_FILE}: not a `stedm train-stedm` output")
    run = read_json(run_file)
    config = load_config(
        {
            k: v
            for k, v in run.get("config", {}).items()
            if k in ("labels", "tiling", "stedm", "seed")
        }
    )
    ae_dir = Path(autoencoder or run["autoencoder"]["path"])
    weights = sorted(ae_dir.glob("*.safetensors"))
    ae_sha = sha256_file(weights[0]) if weights else ""
    expected = run["autoencoder"].get("sha256")
    if expected and ae_sha != expected:
        raise StedmError(
            f"autoencoder {ae_dir} (sha256 {ae_sha[:12]}) is not the one {model_dir} was trained with "
            f"({run['autoencoder'].get('path')}, sha256 {expected[:12]}); pass --autoencoder with that one"
        )
    device = device or default_device()
    if device.startswith("cuda"):  # same kernels every run: shards merge bit-identically
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    model = StedmModel.from_pretrained(model_dir, device=device).eval()
    ae = load_autoencoder(ae_dir).to(device).eval()
    log.info(
        "loaded %s (%s) and autoencoder %s on %s", model_dir, model.config.preset, ae_dir, device
    )
    return Generator(
        model, ae, config, model_dir, sha256_file(model_dir / WEIGHTS_NAME), ae_dir, ae_sha
    )


# --------------------------------------------------------------------------- shards
def shard_rows(n_rows: int, batch_size: int, n_shards: int, shard: int) -> range:
    """Rows of shard `shard`: whole micro-batches, so batch composition never depends on K."""
    if not 0 <= shard < n_shards:
        raise StedmError(f"shard {shard} out of range for synthesis.n_shards={n_shards}")
    n_batches = math.ceil(n_rows / batch_size)
    b0, b1 = shard * n_batches // n_shards, (shard + 1) * n_batches // n_shards
    return range(min(b0 * batch_size, n_rows), min(b1 * batch_size, n_rows))


def provenance_columns(rows: list[StyleQuery], settings: SamplingSettings) -> dict[str, np.ndarray]:
    """Per-sample provenance arrays: every query column plus the sampler settings."""
    types = {"int": np.int64, "float": np.float64, "str": str}
    cols = {
        f.name: np.asarray([getattr(r, f.name) for r in rows], dtype=types[f.type])
        for f in fields(StyleQuery)
    }
    n = len(rows)
    cols["sampler"] = np.asarray([settings.sampler] * n, dtype=str)
    cols["steps"] = np.full(n, settings.steps, np.int64)
    cols["guidance_scale"] = np.full(n, settings.guidance_scale, np.float64)
    cols["guidance_rescale"] = np.full(n, settings.guidance_rescale, np.float64)
    return cols


def create_store(path: Path, n: int, tile: int, attrs: dict[str, Any]) -> zarr.Group:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("images", shape=(n, tile, tile, 3), chunks=(1, tile, tile, 3), dtype="uint8")
    group.create_array("labels", shape=(n, tile, tile), chunks=(1, tile, tile), dtype="uint8")
    group.attrs.update(attrs)
    return group


def write_columns(group: zarr.Group, columns: dict[str, np.ndarray]) -> None:
    for name, values in columns.items():
        dtype = str if values.dtype.kind in "UTO" else values.dtype
        group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),), dtype=dtype)
        if len(values):
            group[name][:] = values


class StyleReader:
    """Layout labels and (augmented) style sets of query rows, read from the tile stores."""

    def __init__(
        self, tiles_dir: Path, slides: set[str], gen: Generator, cache_limit_mb: float = 512.0
    ):
        paths = {s: Path(tiles_dir) / f"{s}.zarr" for s in sorted(slides)}
        missing = [str(p) for p in paths.values() if not p.is_dir()]
        if missing:
            raise StedmError(f"tile stores missing: {missing[:3]}; run the tiling stage")
        classes, tile = list(gen.config.labels.classes), gen.config.tiling.tile_size
        nbytes = 0
        for path in paths.values():
            group = zarr.open_group(str(path), mode="r")
            nbytes += sum(group[k].nbytes for k in ("images", "labels") if k in group)
            if list(group.attrs.get("class_names", classes)) != classes:
                raise StedmError(
                    f"{path} has classes {group.attrs['class_names']}, the model was trained on {classes}"
                )
            if group["images"].shape[1] != tile:
                raise StedmError(
                    f"{path} has {group['images'].shape[1]} px tiles, the model was trained on {tile} px"
                )
        # small stores (the demo's) are read whole: one read per store beats a chunk per tile
        self.reader = _StoreReader(paths, cache=nbytes < cache_limit_mb * 2**20)

    def layout(self, row: StyleQuery) -> np.ndarray:
        return augment_layout(self.reader.label(row.layout_slide, row.layout_tile), row)

    def style_set(self, row: StyleQuery) -> torch.Tensor:
        """(n, 3, T, T) in [-1, 1]; each tile flipped/rotated at random from the row's seed."""
        rng = np.random.default_rng(row.seed)
        tiles = [
            dihedral(self.reader.image(row.style_slide, j), *random_dihedral(rng))
            for j in row.style_tile_list
        ]
        return torch.stack([to_model_image(t) for t in tiles])


def generate_rows(
    gen: Generator,
    rows: list[StyleQuery],
    reader: StyleReader,
    settings: SamplingSettings,
    batch_size: int,
    group: zarr.Group,
    desc: str = "generate",
) -> float:
    """Render `rows` (a shard) micro-batch by micro-batch into `group`; returns images/s."""
    no_style = not rows or rows[0].strategy == "none"
    null_cond = None
    start = time.perf_counter()
    with tqdm(total=len(rows), desc=desc, unit="img", mininterval=2.0) as bar:
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo : lo + batch_size]
            labels = np.stack([reader.layout(r) for r in batch])
            style = None if no_style else torch.stack([reader.style_set(r) for r in batch])
            if (
                style is not None
                and null_cond is None
                and settings.guidance_scale != 1
                and gen.model.style_encoder is not None
            ):
                null_cond = gen.model.null_cond(
                    1, n_style=style.shape[1], style_size=style.shape[-1], device=gen.device
                )
            images = synthesize(
                gen.model,
                gen.ae,
                gen.onehot(labels),
                style,
                [r.seed for r in batch],
                settings,
                null_cond=null_cond,
            )
            group["images"][lo : lo + len(batch)] = images.numpy()
            group["labels"][lo : lo + len(batch)] = labels
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    return len(rows) / seconds if seconds > 0 else float("nan")


def generate_shard(
    config: Config,
    budget: int,
    queries: Path,
    tiles_dir: Path,
    model_dir: Path,
    out: Path,
    shard: int = 0,
    autoencoder: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Generate shard `shard` of `synthesis.n_shards` of a style-query table into store `out`."""
    syn = config.synthesis
    settings = SamplingSettings.from_config(syn)
    all_rows = read_queries(queries)
    span = shard_rows(len(all_rows), syn.batch_size, syn.n_shards, shard)
    rows = all_rows[span.start : span.stop]
    gen = load_generator(model_dir, autoencoder, device)
    lab = gen.config.labels
    if (list(config.labels.classes), config.labels.ignore_index) != (
        list(lab.classes),
        lab.ignore_index,
    ):
        raise StedmError(
            f"config labels {list(config.labels.classes)}/{config.labels.ignore_index} differ from the model's "
            f"{list(lab.classes)}/{lab.ignore_index}; retrain the model or fix labels"
        )
    slides = {r.layout_slide for r in rows} | {r.style_slide for r in rows if r.style_slide}
    reader = StyleReader(tiles_dir, slides, gen)
    attrs = gen.attrs() | {
        "budget": budget,
        "sampling": asdict(settings),
        "n_samples": len(all_rows),
        "shard": shard,
        "n_shards": syn.n_shards,
        "rows": [span.start, span.stop],
        "device": str(gen.device),
    }
    log.info(
        "budget %d shard %d/%d: rows %d..%d (%d samples), %s %d steps, guidance %.2f (rescale %.2f)",
        budget,
        shard,
        syn.n_shards,
        span.start,
        span.stop,
        len(rows),
        settings.sampler,
        settings.steps,
        settings.guidance_scale,
        settings.guidance_rescale,
    )
    with atomic_output(out) as tmp:
        group = create_store(tmp, len(rows), gen.config.tiling.tile_size, attrs)
        rate = generate_rows(
            gen,
            rows,
            reader,
            settings,
            syn.batch_size,
            group,
            f"generate budget~{budget} shard~{shard}",
        )
        write_columns(group, provenance_columns(rows, settings))
    log.info("wrote %s: %d samples at %.2f images/s", out, len(rows), rate)
    return {"n": len(rows), "images_per_s": rate}


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="trained STEDM model directory")
    parser.add_argument(
        "--autoencoder",
        type=Path,
        default=None,
        help="autoencoder dir (default: from stedm_run.json)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="shard store (workflow) or output folder (user mode)",
    )
    parser.add_argument(
        "--config", default=None, help="config YAML/JSON file or inline JSON (synthesis section)"
    )
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    wf = parser.add_argument_group("workflow mode")
    wf.add_argument("--budget", type=int, help="annotation budget")
    wf.add_argument("--queries", type=Path, help="style-query CSV from `stedm select-styles`")
    wf.add_argument("--tiles-dir", type=Path, help="folder of <slide>.zarr stores")
    wf.add_argument(
        "--shard", type=int, default=0, help="shard index (0 .. synthesis.n_shards - 1)"
    )
    from stedm.synthesis.user import add_user_arguments

    add_user_arguments(parser.add_argument_group("user mode (instead of --queries)"))


def run(args: argparse.Namespace) -> None:
    if args.layout is not None or args.layout_geojson is not None:
        from stedm.synthesis.user import run_user

        run_user(args)
        return
    missing = [
        f"--{k.replace('_', '-')}"
        for k in ("budget", "queries", "tiles_dir")
        if getattr(args, k) is None
    ]
    if missing:
        raise StedmError(
            f"workflow mode needs {', '.join(missing)} (or use --layout for user mode)"
        )
    config = load_config(args.config)
    generate_shard(
        config,
        args.budget,
        args.queries,
        args.tiles_dir,
        args.model,
        args.out,
        args.shard,
        args.autoencoder,
        args.device,
    )
