"""Whole-slide segmentation inference: sliding-window path vs. the raw model forward.

Writes one pyramidal TIFF (tissue blob on glass), runs `SlidePrediction` (the path `stedm
evaluate-seg` uses: tissue-window selection, strip reads, batching, Gaussian blending, row-strip
finalisation) with the demo model, then times the bare model forward on the same number of tiles
of the same size and batch size. Prints tiles/s and megapixels/s (working resolution) of both and
their ratio (target >= 0.6: the machinery around the model must not dominate), plus the full
per-slide evaluation (with ground truth and overlay) for reference. Runs alternate and the best
of `--repeats` is kept, which damps noise from other processes on a shared machine; the share of
the sliding path's own wall time spent in the model call is reported too (immune to such noise).

    python benchmarks/seg_inference.py [--size 4096] [--mpp 0.5] [--tile 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from stedm.config import load_config
from stedm.data.manifest import SlideRecord
from stedm.data.slide import open_slide
from stedm.data.tiff import write_pyramidal_tiff
from stedm.segmentation.evaluate import evaluate_slide, slide_tissue
from stedm.segmentation.model import SegModelConfig, build_model
from stedm.segmentation.wsi import SlidePrediction, model_predictor


def make_slide(folder: Path, size: int, mpp: float) -> SlideRecord:
    """A `size` px square slide: a smooth random tissue blob (~60 % of the area) on glass."""
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(size=(size // 16, size // 16)), 6)
    yy, xx = np.mgrid[: size // 16, : size // 16] / (size // 16) - 0.5
    blob = np.kron((field - (xx**2 + yy**2) * 2 > -0.35).astype(np.uint8), np.ones((16, 16), np.uint8)).astype(bool)
    rgb = np.full((size, size, 3), (242, 240, 243), np.uint8)
    texture = np.clip(np.array([200, 110, 170]) + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    rgb[blob] = texture[blob]
    path = folder / "bench.tiff"
    write_pyramidal_tiff(path, rgb, mpp, n_levels=4, compression="jpeg")
    ys, xs = np.nonzero(blob[::64, ::64])
    box = [[int(xs.min() * 64), int(ys.min() * 64)], [int(xs.max() * 64), int(ys.min() * 64)],
           [int(xs.max() * 64), int(ys.max() * 64)], [int(xs.min() * 64), int(ys.max() * 64)]]
    ann = folder / "bench.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[*box, box[0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    return SlideRecord("bench", "P", path, ann)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="level-0 slide edge in px")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px (working: 1 µm/px)")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config({"tracking": {"enabled": False},
                          "tiling": {"tile_size": args.tile, "mpp": 1.0, "thumbnail_mpp": 16.0},
                          "segmentation": {"eval_overlap": args.overlap, "eval_batch_size": args.batch}})
    cfg = SegModelConfig.from_workflow(config.segmentation, config.labels, tile_size=args.tile, tile_mpp=1.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = model_predictor(model)
    print(f"torch threads: {torch.get_num_threads()}, model: {cfg.preset} {cfg.encoder_name}")
    with tempfile.TemporaryDirectory() as tmp:
        record = make_slide(Path(tmp), args.size, args.mpp)
        with open_slide(record.slide_path) as slide:
            tissue = slide_tissue(slide, config)

            def sliding() -> tuple[float, SlidePrediction]:
                prediction = SlidePrediction(
                    slide, predictor, mpp=1.0, tile=args.tile, overlap=args.overlap, tissue=tissue,
                    tissue_mpp=16.0, foreground=cfg.foreground, n_classes=cfg.classes,
                    batch_size=args.batch, progress=False)
                start = time.perf_counter()
                for _ in prediction:
                    pass
                return time.perf_counter() - start, prediction

            _, probe = sliding()  # warm-up (allocator, OpenSlide caches)
            n = probe.n_windows
            # the very same windows, read up front: the raw forward sees identical pixels
            rows = [probe._read_row(j)[0] for j in range(probe.ys.size) if probe.has_tissue[j].any()]
            images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 127.5 - 1
            images = images.contiguous(memory_format=torch.channels_last)  # the faster layout on CPU

            def raw() -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    for i in range(0, n, args.batch):
                        model(images[i : i + args.batch]).float().softmax(1)
                return time.perf_counter() - start

            raw()
            t_sw, t_raw, t_read, share = [], [], [], []
            for _ in range(args.repeats):
                seconds, prediction = sliding()
                t_sw.append(seconds)
                t_read.append(prediction.read_seconds)
                share.append(prediction.model_seconds / seconds)
                t_raw.append(raw())
        sw, rw = min(t_sw), min(t_raw)
        slide_mp = probe.width * probe.height / 1e6
        tile_mp = n * args.tile**2 / 1e6
        print(f"slide {args.size}² px at {args.mpp} µm/px -> {probe.width}x{probe.height} px at 1 µm/px; "
              f"{n} of {probe.n_windows_total} windows hold tissue ({args.tile} px, overlap {args.overlap})")
        print(f"sliding window : {n / sw:7.1f} tiles/s  {tile_mp / sw:6.2f} Mpx/s of windows  "
              f"{slide_mp / sw:6.2f} Mpx/s of slide  ({sw:.2f} s; reads {min(t_read):.2f} s on the prefetch thread)")
        print(f"raw forward    : {n / rw:7.1f} tiles/s  {tile_mp / rw:6.2f} Mpx/s  ({rw:.2f} s)")
        print(f"ratio sliding/raw (best runs): {rw / sw:.2f} (target >= 0.6); runs sliding "
              f"{[round(t, 2) for t in t_sw]} s, raw {[round(t, 2) for t in t_raw]} s")
        print(f"model call share of the sliding path's wall time (same run, robust to load from other "
              f"processes): median {np.median(share):.2f}, runs {[round(x, 2) for x in share]}")
        start = time.perf_counter()
        counts, _, info = evaluate_slide(record, predictor, config, cfg, progress=False)
        total = time.perf_counter() - start
        print(f"full evaluate_slide (tissue mask, inference, ground truth, counts, overlay): {total:.2f} s, "
              f"{n / total:.1f} tiles/s")


if __name__ == "__main__":
    main()
