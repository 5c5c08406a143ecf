"""Sampling speed and quality: the paper's procedure against ours, measured in one run.

- paper: DDIM with 128 nominal steps (LDM's uniform discretisation runs 143), eta 0, guidance
  1.5 with rescale 0.7, the conditional and unconditional branches as two UNet calls per step;
- ours: DPM-Solver++ (2nd order) with 20 steps, the same guidance, both branches in one call.

Both render the same layouts and style sets (a style-query table over unseen slides) with the same
per-sample seeds, batch by batch in alternation, so machine load affects both alike. Printed:
images/s, UNet calls per batch and UNet sample-evaluations per image, and a quality check: the
Fréchet distance between feature statistics of the two samplers' outputs, against the distance
between two DDIM runs that differ only in their seeds (the sampling-noise floor). Two feature
sets: per-image mean/std of the RGB and HED (haematoxylin, eosin, DAB) channels, and the
per-channel mean/std of a small random convolution net with a fixed seed.

Model: `--model DIR` (a `train-stedm` output, e.g. results/stedm/budget~6/model, with
`--tiles-dir` and `--splits` of its workflow run), else a tiny model trained here in a few
minutes on a 12-slide demo cohort tiled at 64 px (8 slides train, 4 unseen style slides).

    python benchmarks/sampling.py [--model DIR --tiles-dir DIR --splits FILE] [--n 48] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from skimage.color import rgb2hed

from stedm.config import load_config
from stedm.io import read_json
from stedm.models.stedm import StedmModel
from stedm.synthesis.generate import StyleReader, load_generator
from stedm.synthesis.sampling import SamplingSettings, synthesize
from stedm.synthesis.select import select_styles

PAPER = SamplingSettings("ddim", 128, 1.5, 0.7, batched_cfg=False)
OURS = SamplingSettings("dpm_solver++", 20, 1.5, 0.7, batched_cfg=True)


# --------------------------------------------------------------------------- a tiny trained model
def train_tiny(work: Path, tile: int, ae_steps: int, stedm_steps: int) -> tuple[Path, Path, dict]:
    from stedm.data.demo import make_demo_cohort
    from stedm.data.manifest import read_manifest
    from stedm.diffusion.train import train_stedm
    from stedm.diffusion.train_autoencoder import train_autoencoder
    from stedm.tiling.tiler import tile_slide

    config = load_config(
        {
            "tracking": {"enabled": False},
            "cohort": {"demo": {"n_slides": 12, "size_px": 1024}},
            "tiling": {"mpp": 1.0, "tile_size": tile, "thumbnail_mpp": 8.0},
            "autoencoder": {"steps": ae_steps, "batch_size": 8},
            "stedm": {"steps": stedm_steps, "batch_size": 8, "checkpoint_every": stedm_steps},
        }
    )
    records = read_manifest(make_demo_cohort(config, work / "cohort", workers=2))
    stores = []
    for r in records:
        tile_slide(
            r, config, work / "tiles" / f"{r.slide_id}.zarr", work / "tiles" / f"{r.slide_id}.png"
        )
        stores.append(work / "tiles" / f"{r.slide_id}.zarr")
    ids = [r.slide_id for r in records]
    splits = {
        "budgets": {"8": ids[:8]},
        "train_pool": ids[:8],
        "val": [],
        "test": [],
        "style_pool": ids[8:],
    }
    (work / "splits.json").write_text(json.dumps(splits))
    t0 = time.perf_counter()
    train_autoencoder(config, stores[:6], stores[6:8], work / "ae", work / "ae.work")
    train_stedm(config, 8, stores[:8], work / "ae", work / "model", work / "model.work")
    print(
        f"trained a tiny autoencoder ({ae_steps} steps) + STEDM ({stedm_steps} steps) on {tile} px tiles "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return work / "model", work / "tiles", splits


# --------------------------------------------------------------------------- features and distance
def colour_features(images: np.ndarray) -> np.ndarray:
    """(N, 12): per-image mean and std of R, G, B and of the HED channels."""
    rgb = images.astype(np.float64) / 255.0
    hed = np.stack([rgb2hed(im) for im in images])
    both = np.concatenate([rgb, hed], axis=-1).reshape(len(images), -1, 6)
    return np.concatenate([both.mean(1), both.std(1)], axis=1)


@torch.no_grad()
def random_conv_features(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 16): mean/std of 8 channels of a fixed random 2-layer conv net (texture statistics)."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 3, 5, 5, generator=gen) / 75**0.5
    w2 = torch.randn(8, 8, 3, 3, generator=gen) / 72**0.5
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    h = torch.nn.functional.conv2d(
        torch.relu(torch.nn.functional.conv2d(x, w1, stride=2)), w2, stride=2
    )
    return torch.cat([h.mean((2, 3)), h.std((2, 3))], 1).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


# --------------------------------------------------------------------------- measurement
class CallCounter:
    """Counts UNet calls and sample-evaluations (rows) through `StedmModel.forward`."""

    def __init__(self) -> None:
        self.calls = self.rows = 0
        self._original = StedmModel.forward
        counter = self

        def forward(model, latents, *args, **kwargs):
            counter.calls += 1
            counter.rows += latents.shape[0]
            return counter._original(model, latents, *args, **kwargs)

        StedmModel.forward = forward

    def reset(self) -> tuple[int, int]:
        out, self.calls, self.rows = (self.calls, self.rows), 0, 0
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tiles-dir", type=Path, default=Path("results/tiles"))
    parser.add_argument("--splits", type=Path, default=Path("results/splits/splits.json"))
    parser.add_argument("--n", type=int, default=48, help="images per sampler")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tile", type=int, default=64, help="tile size of the model trained here")
    parser.add_argument("--ae-steps", type=int, default=200)
    parser.add_argument("--stedm-steps", type=int, default=400)
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep (or reuse) the trained model here"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared box, OpenMP spin-waits make 2-thread timings erratic)",
    )
    parser.add_argument(
        "--grid", type=Path, default=None, help="PNG: rows paper | ours | paper other seed"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        if args.model is None and Path("results/stedm/budget~6/model").is_dir():
            args.model = Path("results/stedm/budget~6/model")
        if args.model is None and args.keep is not None and (args.keep / "model").is_dir():
            args.model, args.tiles_dir, args.splits = (
                args.keep / "model",
                args.keep / "tiles",
                args.keep / "splits.json",
            )
        if args.model is None:
            model_dir, tiles_dir, splits = train_tiny(
                work, args.tile, args.ae_steps, args.stedm_steps
            )
            budget = 8
        else:
            model_dir, tiles_dir, splits = args.model, args.tiles_dir, read_json(args.splits)
            budget = int(read_json(model_dir / "stedm_run.json")["budget"])
        gen = load_generator(model_dir, device="cpu" if not torch.cuda.is_available() else None)
        run_cfg = gen.config
        config = dataclasses.replace(
            run_cfg, synthesis=dataclasses.replace(run_cfg.synthesis, n_samples=args.n)
        )
        rows = select_styles(config, budget, splits, tiles_dir, model_dir)
        reader = StyleReader(
            tiles_dir,
            {r.layout_slide for r in rows} | {r.style_slide for r in rows if r.style_slide},
            gen,
        )
        batches = []
        for lo in range(0, len(rows), args.batch_size):
            batch = rows[lo : lo + args.batch_size]
            labels = np.stack([reader.layout(r) for r in batch])
            style = (
                None
                if batch[0].strategy == "none"
                else torch.stack([reader.style_set(r) for r in batch])
            )
            batches.append((gen.onehot(labels), style, [r.seed for r in batch]))
        real = np.stack(
            [reader.reader.image(r.style_slide, t) for r in rows for t in r.style_tile_list[:1]]
        )

        counter = CallCounter()
        names = {"paper": PAPER, "ours": OURS}
        out = {k: [] for k in (*names, "paper_seed2")}
        seconds = dict.fromkeys(names, 0.0)
        calls = {}
        layout, style, seeds = batches[0]  # warm-up (lazy inits, allocator)
        synthesize(
            gen.model,
            gen.ae,
            layout[:2],
            None if style is None else style[:2],
            seeds[:2],
            dataclasses.replace(OURS, steps=2),
        )
        for layout, style, seeds in batches:
            for name, settings in names.items():
                counter.reset()
                start = time.perf_counter()
                out[name].append(
                    synthesize(gen.model, gen.ae, layout, style, seeds, settings).numpy()
                )
                seconds[name] += time.perf_counter() - start
                calls[name] = (*counter.reset(), len(seeds))
            other = [s + 1_000_003 for s in seeds]
            out["paper_seed2"].append(
                synthesize(gen.model, gen.ae, layout, style, other, PAPER).numpy()
            )
        images = {k: np.concatenate(v) for k, v in out.items()}
        if args.grid is not None:
            k = min(8, len(rows))
            grid = np.concatenate(
                [np.concatenate(list(images[key][:k]), axis=1) for key in out], axis=0
            )
            Image.fromarray(grid).save(args.grid)

    n = len(rows)
    print(
        f"\nmodel {model_dir} ({gen.model.config.preset}, {gen.config.tiling.tile_size} px tiles, "
        f"strategy {rows[0].strategy}), {n} images per sampler, batch {args.batch_size}, "
        f"device {gen.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'procedure':<44} {'images/s':>9} {'UNet calls/batch':>17} {'UNet evals/image':>17}")
    rate = {}
    for name in names:
        c, r, b = calls[name]
        rate[name] = n / seconds[name]
        label = {
            "paper": "paper: DDIM 128 (143 steps), 2 calls/step",
            "ours": "ours: DPM-Solver++ 20, batched CFG",
        }[name]
        print(f"{label:<44} {rate[name]:>9.2f} {c:>17d} {r / b:>17.0f}")
    print(f"speed-up ours / paper: {rate['ours'] / rate['paper']:.1f}x (target >= 5x)")

    # A = the samples' own seeds, B = other seeds. Ours(A) vs paper(B) is a distance between
    # independent sample sets, comparable to paper(A) vs paper(B), the seed-to-seed noise floor.
    print(f"\nFréchet distance of feature statistics ({n} images per set; lower = more alike)")
    print(
        f"{'features':<34} {'ours A vs paper B':>18} {'paper A vs paper B':>19} {'paper A vs real':>16} "
        f"{'ours A vs real':>15}"
    )
    for fname, feat in (
        ("colour: RGB+HED mean/std (12-D)", colour_features),
        ("random conv mean/std (16-D)", random_conv_features),
    ):
        f = {k: feat(v) for k, v in images.items()}
        fr = feat(real)
        print(
            f"{fname:<34} {frechet(f['ours'], f['paper_seed2']):>18.3g} "
            f"{frechet(f['paper'], f['paper_seed2']):>19.3g} {frechet(f['paper'], fr):>16.3g} "
            f"{frechet(f['ours'], fr):>15.3g}"
        )
    diff = {
        k: np.abs(images[k].astype(float) - images["paper"].astype(float)).mean()
        for k in ("ours", "paper_seed2")
    }
    print(
        f"mean |pixel difference| to the paper sampler's image of the same sample (0-255): ours, same seed "
        f"{diff['ours']:.2f}; paper, other seed {diff['paper_seed2']:.2f}"
    )
    print(
        "(both samplers solve the same probability-flow ODE from the same noise, so with equal seeds their "
        "images nearly coincide; 'real' = one tile of each sample's unseen style slide)"
    )


if __name__ == "__main__":
    main()
