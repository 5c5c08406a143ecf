"""User mode of `stedm generate`: your own layout, in the style of any slide, outside the workflow.

    # a label PNG (one channel, pixel value = class index of the model's labels.classes,
    # labels.ignore_index = unknown), drawn at the model's tiling µm/px
    stedm generate --model results/stedm/budget~6/model --layout labels.png \\
        --style-slide new_scan.svs --n 4 --out out/

    # or a region of a QuPath GeoJSON (level-0 px of its slide, whose level-0 µm/px you give)
    stedm generate --model results/stedm/budget~6/model --layout-geojson slide.geojson \\
        --region 20000,14000,1024,1024 --layout-mpp 0.25 --style-slide new_scan.svs --out out/

Options: `--style-sampling nearby|multi_patch|augmented` (default: the model's training strategy),
`--n-style K`, `--sampler`, `--steps`, `--guidance-scale`, `--guidance-rescale`, `--seed`,
`--batch-size` (defaults from the `synthesis` config section, `--config` to change them),
`--style-store DIR.zarr` (cache of the tiled style slide, reused when it exists), `--style-mpp`
(level-0 µm/px when the slide file lacks it), `--autoencoder`, `--device`.

How it works:
- The style slide is tiled at the model's `tiling` settings (µm/px, tile size, tissue detection)
  into a temporary tile store with `stedm.tiling.tile_slide`, and each sample draws its own style
  set from that slide's tissue tiles (`TileIndex.sample_from_slide`), flipped/rotated at random.
- The layout is used at its own size, pixel for pixel, at the model's µm/px: the denoiser is
  fully convolutional, so no resizing (which would change the tissue scale) and no tiling (which
  would leave seams) is needed. The layout is padded by reflection to a multiple of the UNet's
  stride (16 px for both presets) and the images are cropped back. Very large layouts cost memory
  in proportion to their area and drift from the training tile size; a few tile widths are fine.
- A GeoJSON region is rasterised with `load_annotations(...).rasterize` at the model's µm/px;
  pixels no annotation covers are `ignore_index` (labels.unannotated: ignore) or background.

Output folder (written atomically): `image_000.png` ... (RGB, the layout's size), `layout.png`
(the class-index label the images were conditioned on), `style_000.png` ... (each sample's style
tiles side by side), `generation.json` (model, autoencoder sha256, settings, style slide, and per
sample its seed and style tiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stedm.config import load_config
from stedm.data.manifest import SlideRecord
from stedm.diffusion.data import _StoreReader, dihedral, random_dihedral, to_model_image
from stedm.diffusion.style_sampling import TileIndex
from stedm.errors import StedmError
from stedm.io import atomic_output
from stedm.synthesis.generate import Generator, load_generator
from stedm.synthesis.sampling import SamplingSettings, synthesize
from stedm.synthesis.select import check_model_set_size, resolve_strategy

log = logging.getLogger(__name__)


def add_user_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--layout", type=Path, default=None, help="class-index label PNG at the model's µm/px"
    )
    group.add_argument(
        "--layout-geojson", type=Path, default=None, help="QuPath GeoJSON to rasterise"
    )
    group.add_argument(
        "--region", default=None, help="x,y,w,h in level-0 px of the GeoJSON's slide"
    )
    group.add_argument(
        "--layout-mpp", type=float, default=None, help="level-0 µm/px of the GeoJSON's slide"
    )
    group.add_argument(
        "--style-slide", type=Path, default=None, help="any OpenSlide-readable slide"
    )
    group.add_argument(
        "--style-mpp",
        type=float,
        default=None,
        help="level-0 µm/px of the style slide if not in the file",
    )
    group.add_argument(
        "--style-store", type=Path, default=None, help="tile store cache of the style slide"
    )
    group.add_argument("--n", type=int, default=4, help="images to generate")
    group.add_argument(
        "--style-sampling", choices=["nearby", "multi_patch", "augmented"], default=None
    )
    group.add_argument(
        "--n-style", type=int, default=None, help="style tiles per set (multi_patch)"
    )
    group.add_argument("--sampler", choices=["dpm_solver++", "ddim"], default=None)
    group.add_argument("--steps", type=int, default=None)
    group.add_argument("--guidance-scale", type=float, default=None)
    group.add_argument("--guidance-rescale", type=float, default=None)
    group.add_argument("--batch-size", type=int, default=None)
    group.add_argument("--seed", type=int, default=0)


def read_layout_png(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise StedmError(f"layout PNG not found: {path}")
    image = Image.open(path)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise StedmError(
            f"{path} is a {image.mode} image; the layout must be single-channel class indices "
            "(0..C-1 in the order of the model's labels.classes, labels.ignore_index = unknown)"
        )
    label = np.asarray(image)
    if label.max(initial=0) > 255:
        raise StedmError(f"{path}: label values above 255")
    return label.astype(np.uint8)


def rasterize_region(
    gen: Generator, geojson: Path, region: str, layout_mpp: float | None
) -> np.ndarray:
    from stedm.data.annotations import load_annotations

    if region is None or layout_mpp is None:
        raise StedmError(
            "--layout-geojson needs --region x,y,w,h and --layout-mpp (level-0 µm/px of its slide)"
        )
    try:
        x, y, w, h = (float(v) for v in region.split(","))
    except ValueError:
        raise StedmError(f"--region must be x,y,w,h in level-0 px, got {region!r}") from None
    lab, mpp = gen.config.labels, gen.config.tiling.mpp
    scale = mpp / layout_mpp  # level-0 px per output px
    size = (max(1, round(w / scale)), max(1, round(h / scale)))
    fill = lab.ignore_index if lab.unannotated == "ignore" else 0
    return load_annotations(geojson, lab).rasterize(x, y, size[0], size[1], scale, fill)


def style_store(
    gen: Generator, slide: Path, cache: Path | None, mpp: float | None, work: Path
) -> Path:
    """A tile store of the style slide at the model's tiling settings (cached at `cache`)."""
    from stedm.tiling.tiler import tile_slide

    if cache is not None and cache.is_dir():
        store = cache
    else:
        store = cache or work / "style.zarr"
        config = load_config(
            {
                "labels": dataclasses.asdict(gen.config.labels),
                "tiling": dataclasses.asdict(gen.config.tiling),
            }
        )
        record = SlideRecord(
            slide_id=Path(slide).stem, patient_id=Path(slide).stem, slide_path=Path(slide), mpp=mpp
        )
        tile_slide(record, config, store, work / "style.thumbnail.png")
    import zarr

    attrs = zarr.open_group(str(store), mode="r").attrs
    if (attrs.get("mpp"), attrs.get("tile_size")) != (
        gen.config.tiling.mpp,
        gen.config.tiling.tile_size,
    ):
        raise StedmError(
            f"style store {store} has {attrs.get('tile_size')} px tiles at {attrs.get('mpp')} µm/px; the model "
            f"needs {gen.config.tiling.tile_size} px at {gen.config.tiling.mpp} µm/px (delete it to retile)"
        )
    return store


def _pad_multiple(model) -> int:
    return 4 * 2 ** (len(model.config.denoiser.block_out_channels) - 1)


def run_user(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise StedmError(f"--n must be >= 1, got {args.n}")
    gen = load_generator(args.model, args.autoencoder, args.device)
    syn = load_config(args.config).synthesis
    overrides = {
        k: getattr(args, k)
        for k in (
            "sampler",
            "steps",
            "guidance_scale",
            "guidance_rescale",
            "batch_size",
            "n_style",
            "style_sampling",
        )
        if getattr(args, k) is not None
    }
    syn = dataclasses.replace(syn, **overrides)
    settings = SamplingSettings.from_config(syn)
    strategy, n_style = resolve_strategy(dataclasses.replace(gen.config, synthesis=syn))
    check_model_set_size(args.model, strategy, n_style)
    if strategy != "none" and args.style_slide is None and args.style_store is None:
        raise StedmError("user mode needs --style-slide (or an existing --style-store)")
    label = (
        read_layout_png(args.layout)
        if args.layout is not None
        else rasterize_region(gen, args.layout_geojson, args.region, args.layout_mpp)
    )
    h, w = label.shape
    m = _pad_multiple(gen.model)
    padded = np.pad(label, ((0, -h % m), (0, -w % m)), mode="symmetric")
    layout = gen.onehot(padded[None])

    with tempfile.TemporaryDirectory() as work, atomic_output(args.out) as tmp:
        tmp.mkdir(parents=True)
        seeds = [
            int(np.random.SeedSequence([args.seed, i, 1]).generate_state(1)[0])
            for i in range(args.n)
        ]
        styles, refs = None, [[] for _ in seeds]
        slide_id = ""
        if strategy != "none":
            store = style_store(gen, args.style_slide, args.style_store, args.style_mpp, Path(work))
            index = TileIndex([store])
            slide_id = index.slide_ids[0]
            reader = _StoreReader({slide_id: store}, cache=False)
            refs = [
                index.sample_from_slide(
                    np.random.default_rng([args.seed, i, 0]),
                    slide_id,
                    strategy,
                    n_style,
                    gen.config.stedm.nearby_distance_um,
                )
                for i in range(args.n)
            ]
            sets = []
            for seed, ref in zip(seeds, refs, strict=True):
                rng = np.random.default_rng(seed)
                tiles = [dihedral(reader.image(s, j), *random_dihedral(rng)) for s, j in ref]
                sets.append(torch.stack([to_model_image(t) for t in tiles]))
                Image.fromarray(np.concatenate([reader.image(s, j) for s, j in ref], axis=1)).save(
                    tmp / f"style_{len(sets) - 1:03d}.png"
                )
            styles = torch.stack(sets)
        for lo in range(0, args.n, syn.batch_size):
            hi = min(args.n, lo + syn.batch_size)
            batch_style = None if styles is None else styles[lo:hi]
            images = synthesize(
                gen.model,
                gen.ae,
                layout.expand(hi - lo, -1, -1, -1),
                batch_style,
                seeds[lo:hi],
                settings,
            ).numpy()
            for i, image in enumerate(images, start=lo):
                Image.fromarray(image[:h, :w]).save(tmp / f"image_{i:03d}.png")
        Image.fromarray(label).save(tmp / "layout.png")
        info = gen.attrs() | {
            "sampling": dataclasses.asdict(settings),
            "strategy": strategy,
            "n_style": n_style,
            "style_slide": str(args.style_slide or args.style_store),
            "style_slide_id": slide_id,
            "layout_file": str(args.layout or args.layout_geojson),
            "region": args.region,
            "seed": args.seed,
            "samples": [
                {"image": f"image_{i:03d}.png", "seed": s, "style_tiles": [j for _, j in r]}
                for i, (s, r) in enumerate(zip(seeds, refs, strict=True))
            ],
        }
        (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "wrote %d images of %dx%d px in the style of %s to %s",
        args.n,
        w,
        h,
        slide_id or "-",
        args.out,
    )
