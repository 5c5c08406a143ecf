"""A miniature CATCH release in the exact public formats, for tests of import and workflow.

`make_catch_fixture(dir)` writes Aperio-style `.svs` TIFFs (OpenSlide reads them as vendor
`aperio` with the µm/px from the `MPP` field, like real CATCH slides), `CATCH.json` (COCO with
CATCH's 13 fixed category ids, flat `segmentation` lists ordered outer first) and `datasets.csv`
(`Slide;Dataset;Scanner`). The formats are described in `stedm/data/catch.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from shapely.geometry import Polygon

from stedm.data.catch import CATEGORIES, TYPES
from stedm.data.tiff import build_pyramid
from stedm.io import atomic_output


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """A closed, jittered ellipse as CATCH's flat [x1, y1, ..., x1, y1] integer list."""
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    r = rng.uniform(0.85, 1.0, t.size)
    pts = np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], 1).round().astype(int)
    pts = np.vstack([pts, pts[:1]])
    return pts.ravel().tolist()


def make_catch_fixture(
    directory: str | Path,
    n_patients_per_type: int = 3,
    size_px: tuple[int, int] = (1536, 1024),
    mpp: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write a miniature CATCH release: Aperio-style `.svs` TIFFs, `CATCH.json`, `datasets.csv`.

    Per tumour type, dog 01 is test, dog 02 val, the rest train; `Histiocytoma_01` (test) and
    `Histiocytoma_03` (train) have a second slide `_2`. Each slide: a Dermis region with an
    Epidermis band, the type's tumour inside, and Inflamm/Necrosis inside the tumour, listed
    outer first and painted in file order (as CATCH). The µm/px is in the Aperio description.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = {name: i for i, name in CATEGORIES.items()}
    colours = {
        "Dermis": (205, 125, 175),
        "Epidermis": (170, 90, 150),
        "Inflamm/Necrosis": (225, 175, 200),
    }
    w, h = size_px
    images, annotations, rows = [], [], []
    for prefix, tumour in TYPES.items():
        for dog in range(1, n_patients_per_type + 1):
            tint = rng.uniform(0.85, 1.1, 3)  # the dog's staining style
            dataset = "test" if dog == 1 else "val" if dog == 2 else "train"
            for k in (1, 2) if prefix == "Histiocytoma" and dog in (1, 3) else (1,):
                name = f"{prefix}_{dog:02d}_{k}.svs"
                polys = [
                    ("Dermis", _blob(rng, w / 2, h / 2, w * 0.4, h * 0.4)),
                    ("Epidermis", _blob(rng, w / 2, h * 0.15, w * 0.3, h * 0.06)),
                    (tumour, _blob(rng, w / 2, h * 0.55, w * 0.2, h * 0.22)),
                    ("Inflamm/Necrosis", _blob(rng, w / 2, h * 0.55, w * 0.05, h * 0.05)),
                ]
                canvas = Image.new("RGB", (w, h), (242, 240, 245))
                draw = ImageDraw.Draw(canvas)
                for cls, flat in polys:  # file order, later on top
                    colour = colours.get(cls, (120, 60, 150))
                    draw.polygon(
                        flat, fill=tuple(int(c * t) for c, t in zip(colour, tint, strict=True))
                    )
                rgb = np.asarray(canvas, np.float32) + rng.normal(0, 6, (h, w, 3))
                _write_svs(
                    directory / name,
                    build_pyramid(np.clip(rgb, 0, 255).astype(np.uint8), 3),
                    mpp,
                )
                image_id = len(images) + 1
                images.append(
                    {"license": 1, "file_name": name, "id": image_id, "width": w, "height": h}
                )
                for cls, flat in polys:
                    poly = Polygon(list(zip(flat[0::2], flat[1::2], strict=True)))
                    x0, y0, x1, y1 = poly.bounds
                    annotations.append(
                        {
                            "segmentation": flat,
                            "iscrowd": 0,
                            "image_id": image_id,
                            "category_id": ids[cls],
                            "id": len(annotations) + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": poly.area,
                        }
                    )
                rows.append(f"{name};{dataset};{'AT2' if dog % 2 else 'ScanScope v1'}")
    coco = {
        "info": {"description": "CATCH-format test fixture"},
        "licenses": [],
        "categories": [
            {"id": i, "name": n, "supercategory": "Tumor" if i >= 7 else "Tissue"}
            for i, n in CATEGORIES.items()
        ],
        "images": images,
        "annotations": annotations,
    }
    (directory / "CATCH.json").write_text(json.dumps(coco))
    (directory / "datasets.csv").write_text("Slide;Dataset;Scanner\n" + "\n".join(rows) + "\n")
    return directory


def _write_svs(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    """A tiled JPEG TIFF with Aperio ImageDescriptions: OpenSlide reads it as `aperio` with MPP."""
    h0, w0 = levels[0].shape[:2]
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            description = (
                f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} [0,0 {w}x{h}] (256x256) "
                f"JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}"
            )
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=1 if i else 0,
                description=description,
                metadata=None,
            )
