"""`stedm select-styles`: the style-query table that fully determines one budget's synthetic set.

One CSV row per synthetic sample (`synthesis.n_samples` rows), written before any GPU work so
the pairing of layouts and styles can be inspected, versioned and checked on its own:

| column | meaning |
|---|---|
| `sample_id` | 0 .. N-1 (row i is a pure function of `seed`, the budget and i) |
| `layout_slide`, `layout_tile` | an annotated tile of THIS budget's slides (splits.json budgets[b]) |
| `layout_has_fg` | whether that tile has a foreground pixel (layouts are drawn 50/50, like training) |
| `rot90`, `flip` | the dihedral augmentation of the layout (`stedm.diffusion.data.dihedral`) |
| `affine`, `affine_*` | the paper's random affine (p = 0.5, only when `synthesis.affine`): scale 0.8-1.2, rotation (deg), shear (deg, ±20), translation (fraction of the tile, ±0.1); 0/1/0/0/0 = identity |
| `style_slide` | a slide of `splits["style_pool"]` (unannotated, never trained on); empty for `none` |
| `style_tiles` | `;`-joined tile indices of that slide's store (every store tile is a tissue tile) |
| `strategy` | `nearby`, `multi_patch`, `augmented` or `none` |
| `seed` | the sample's seed: initial noise and style-tile flips at generation |

Strategies (`synthesis.style_sampling`; null = the model's training strategy `stedm.style_sampling`):
`nearby` = one tile near a random tissue location of a random style-pool slide; `multi_patch` =
n random tissue tiles of one style-pool slide (n = `synthesis.n_style` or `stedm.n_style`);
`augmented` (training re-augmented the content tile itself) = one random tile of a style-pool
slide, flipped/rotated at generation, as the official code takes another image (n = 1); `none`
(a layout-only model) = no style, and generation runs without guidance.

The table is checked against splits.json before it is written: style slides must be in the
style pool and in no training budget, validation or test set; layout slides must be in the budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from stedm.config import Config, load_config
from stedm.data.splits import budget_slides
from stedm.diffusion.data import dihedral, random_dihedral
from stedm.diffusion.style_sampling import TileIndex
from stedm.errors import StedmError
from stedm.io import atomic_output, read_json
from stedm.models.presets import StedmModelConfig
from stedm.tiling.store import tile_store_paths

log = logging.getLogger(__name__)

AFFINE_P = 0.5  # albumentations' default p, as in the official predict datasets (§4.4)


@dataclass(frozen=True)
class StyleQuery:
    """One row of the style-query table."""

    sample_id: int
    layout_slide: str
    layout_tile: int
    layout_has_fg: int
    rot90: int
    flip: int
    affine: int
    affine_scale: float
    affine_rotate: float
    affine_shear: float
    affine_tx: float
    affine_ty: float
    style_slide: str
    style_tiles: str
    strategy: str
    seed: int

    @property
    def style_tile_list(self) -> list[int]:
        return [int(t) for t in self.style_tiles.split(";")] if self.style_tiles else []


COLUMNS = [f.name for f in fields(StyleQuery)]


def write_queries(path: str | Path, rows: list[StyleQuery]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_queries(path: str | Path) -> list[StyleQuery]:
    """Read a style-query CSV (types restored from the `StyleQuery` fields)."""
    path = Path(path)
    if not path.is_file():
        raise StedmError(f"style-query table not found: {path}; run `stedm select-styles`")
    types = {f.name: f.type for f in fields(StyleQuery)}
    cast = {"int": int, "float": float, "str": str}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StedmError(f"{path} lacks columns {missing}; rerun `stedm select-styles`")
        rows = [StyleQuery(**{c: cast[types[c]](r[c]) for c in COLUMNS}) for r in reader]
    if [r.sample_id for r in rows] != list(range(len(rows))):
        raise StedmError(f"{path}: sample_id must run 0..{len(rows) - 1} in order")
    return rows


# --------------------------------------------------------------------------- layout augmentation
def affine_matrix(row: StyleQuery, size: int) -> np.ndarray:
    """3x3 matrix mapping OUTPUT (row, col) pixel coordinates to INPUT ones (scipy's convention).

    Forward (x, y) map about the tile centre: translate . rotate . shear(x) . scale.
    """
    c = (size - 1) / 2.0
    th, sh = np.deg2rad(row.affine_rotate), np.deg2rad(row.affine_shear)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    shear = np.array([[1, np.tan(sh), 0], [0, 1, 0], [0, 0, 1]])
    scale = np.diag([row.affine_scale, row.affine_scale, 1.0])
    centre = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
    shift = np.array([[1, 0, row.affine_tx * size], [0, 1, row.affine_ty * size], [0, 0, 1]])
    forward_xy = shift @ centre @ rot @ shear @ scale @ np.linalg.inv(centre)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # (x, y) <-> (row, col)
    return swap @ np.linalg.inv(forward_xy) @ swap


def augment_layout(label: np.ndarray, row: StyleQuery) -> np.ndarray:
    """The row's layout: dihedral (flip, rot90), then the affine with nearest-neighbour lookup
    and reflect padding (label maps only: nearest keeps class indices and `ignore_index` exact)."""
    out = dihedral(label, row.rot90, bool(row.flip))
    if row.affine:
        out = ndimage.affine_transform(
            out, affine_matrix(row, out.shape[0]), order=0, mode="reflect", output=out.dtype
        )
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- selection
def resolve_strategy(config: Config) -> tuple[str, int]:
    """(strategy, style tiles per set) at generation, from `synthesis` and the model's `stedm`."""
    strategy = config.synthesis.style_sampling or config.stedm.style_sampling
    if strategy == "none":
        return "none", 0
    if strategy in ("nearby", "augmented"):
        return strategy, 1
    return "multi_patch", int(config.synthesis.n_style or config.stedm.n_style)


def check_model_set_size(model_dir: Path, strategy: str, n: int) -> None:
    """The `linear` aggregation only takes the set size it was trained with."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        raise StedmError(
            f"STEDM model directory {model_dir} has no config.json; train the model first"
        )
    model = StedmModelConfig.from_dict(json.loads(file.read_text()), source=str(file))
    if strategy != "none" and model.aggregation == "linear" and n != model.n_style:
        raise StedmError(
            f"style sets of {n} tiles ({strategy}) cannot feed {model_dir}: its 'linear' aggregation "
            f"was trained on n={model.n_style}; "
            + (
                f"set synthesis.n_style to {model.n_style} (or null)"
                if strategy == "multi_patch"
                else "set synthesis.style_sampling to multi_patch, or train with aggregation mean/max/attention"
            )
        )
    if strategy != "none" and model.aggregation == "none":
        log.warning(
            "model %s has no style encoder (aggregation none): style queries are ignored", model_dir
        )


def layout_pool(
    stores: dict[str, Path], config: Config
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Annotated tiles (any non-ignore pixel) of the given slides: (slide per tile, tile, has fg)."""
    import zarr

    ignore = config.labels.ignore_index
    fg = np.asarray(config.labels.foreground_indices, dtype=np.uint8)
    slides, tiles, has_fg = [], [], []
    for slide_id, path in stores.items():
        group = zarr.open_group(str(path), mode="r")
        if "labels" not in group:
            raise StedmError(
                f"budget slide {slide_id} ({path}) has no labels; it cannot give layouts"
            )
        if int(group.attrs.get("ignore_index", ignore)) != ignore:
            raise StedmError(
                f"{path} uses ignore_index {group.attrs['ignore_index']}, config labels.ignore_index is {ignore}"
            )
        labels = group["labels"]
        for start in range(0, labels.shape[0], 256):
            block = np.asarray(labels[start : start + 256]).reshape(
                -1, labels.shape[1] * labels.shape[2]
            )
            keep = np.flatnonzero((block != ignore).any(axis=1))
            slides += [slide_id] * keep.size
            tiles.append(keep + start)
            has_fg.append(np.isin(block[keep], fg).any(axis=1))
    if not slides:
        raise StedmError(f"no annotated tiles in the budget's slides {sorted(stores)}")
    return slides, np.concatenate(tiles), np.concatenate(has_fg)


def _affine_params(rng: np.random.Generator, enabled: bool) -> dict[str, float | int]:
    if not enabled or rng.random() >= AFFINE_P:
        return {
            "affine": 0,
            "affine_scale": 1.0,
            "affine_rotate": 0.0,
            "affine_shear": 0.0,
            "affine_tx": 0.0,
            "affine_ty": 0.0,
        }
    return {  # rounded: the CSV is the source of truth, and it stays readable
        "affine": 1,
        "affine_scale": round(float(rng.uniform(0.8, 1.2)), 4),
        "affine_rotate": round(float(rng.uniform(-180.0, 180.0)), 3),
        "affine_shear": round(float(rng.uniform(-20.0, 20.0)), 3),
        "affine_tx": round(float(rng.uniform(-0.1, 0.1)), 4),
        "affine_ty": round(float(rng.uniform(-0.1, 0.1)), 4),
    }


def select_styles(
    config: Config, budget: int, splits: dict, tiles_dir: Path, model_dir: Path | None = None
) -> list[StyleQuery]:
    """The style-query rows of one budget (deterministic in `config.seed` and `budget`)."""
    strategy, n = resolve_strategy(config)
    if model_dir is not None:
        check_model_set_size(model_dir, strategy, n)
    def stores(slides: list[str]) -> dict[str, Path]:
        return dict(zip(slides, tile_store_paths(tiles_dir, slides), strict=True))

    layout_slides, layout_tiles, layout_fg = layout_pool(stores(budget_slides(splits, budget)), config)
    fg_rows, bg_rows = np.flatnonzero(layout_fg), np.flatnonzero(~layout_fg)
    pool = list(splits.get("style_pool") or [])
    if strategy != "none" and not pool:
        raise StedmError(
            "splits.json has an empty style_pool: no unseen slides to take styles from"
        )
    index = TileIndex(list(stores(pool).values())) if strategy != "none" else None

    rows = []
    for i in range(config.synthesis.n_samples):
        rng = np.random.default_rng([config.seed, budget, i, 0])
        seed = int(np.random.SeedSequence([config.seed, budget, i, 1]).generate_state(1)[0])
        if fg_rows.size and bg_rows.size:  # 50/50 tiles with / without foreground, as training
            group = fg_rows if rng.random() < 0.5 else bg_rows
            j = int(group[rng.integers(group.size)])
        else:
            j = int(rng.integers(len(layout_slides)))
        k, flip = random_dihedral(rng)
        affine = _affine_params(rng, config.synthesis.affine)
        style_slide, refs = "", []
        if index is not None:
            style_slide = pool[int(rng.integers(len(pool)))]
            refs = index.sample_from_slide(
                rng, style_slide, strategy, n, config.stedm.nearby_distance_um
            )
        rows.append(
            StyleQuery(
                sample_id=i,
                layout_slide=layout_slides[j],
                layout_tile=int(layout_tiles[j]),
                layout_has_fg=int(layout_fg[j]),
                rot90=k,
                flip=int(flip),
                **affine,
                style_slide=style_slide,
                style_tiles=";".join(str(t) for _, t in refs),
                strategy=strategy,
                seed=seed,
            )
        )
    check_queries(rows, splits, budget)
    return rows


def check_queries(rows: list[StyleQuery], splits: dict, budget: int) -> None:
    """Style queries only from the style pool (never a training, validation or test slide);
    layouts only from the budget's slides."""
    pool = set(splits.get("style_pool") or [])
    seen = (
        set(splits.get("train_pool") or [])
        | set(splits.get("val") or [])
        | set(splits.get("test") or [])
    )
    for slides in splits["budgets"].values():
        seen |= set(slides)
    budget_slides = set(splits["budgets"][str(budget)])
    bad_style = sorted(
        {
            r.style_slide
            for r in rows
            if r.style_slide and (r.style_slide not in pool or r.style_slide in seen)
        }
    )
    bad_layout = sorted({r.layout_slide for r in rows if r.layout_slide not in budget_slides})
    no_style = [
        r.sample_id for r in rows if r.strategy != "none" and not (r.style_slide and r.style_tiles)
    ]
    if bad_style or bad_layout or no_style:
        raise StedmError(
            f"style-query table violates splits.json: style slides outside the style pool or seen in "
            f"training/validation/test {bad_style}; layout slides outside budget {budget} {bad_layout}; "
            f"rows without style tiles {no_style[:5]}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget", required=True, type=int, help="annotation budget, a key of splits.json budgets"
    )
    parser.add_argument("--splits", required=True, type=Path, help="splits.json")
    parser.add_argument(
        "--tiles-dir", required=True, type=Path, help="folder of <slide>.zarr stores"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="trained STEDM model dir (checks the style set size)",
    )
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")
    parser.add_argument("--out", required=True, type=Path, help="output CSV")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    rows = select_styles(config, args.budget, read_json(args.splits), args.tiles_dir, args.model)
    write_queries(args.out, rows)
    styles = sorted({r.style_slide for r in rows if r.style_slide})
    log.info(
        "wrote %s: %d queries (%s), layouts from %d slides, styles from %d style-pool slides",
        args.out,
        len(rows),
        rows[0].strategy if rows else "-",
        len({r.layout_slide for r in rows}),
        len(styles),
    )
