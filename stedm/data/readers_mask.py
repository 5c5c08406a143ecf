"""Label-mask annotations: an image of class codes at a known downsample, sampled when rasterised.

The convention:

- The mask: a single-channel image (`.png`, `.tif` or `.tiff`; 8 or 16 bit; palette PNGs give
  their palette indices) whose pixel values are class codes. Name it `<slide>.mask.png`.
- Its sidecar: the same path with the suffix `.json` (`s01.mask.png` -> `s01.mask.json`)::

      {"downsample": 16, "classes": {"1": "Tumor", "2": "Stroma"}}

  - `downsample`: level-0 pixels per mask pixel. Mask pixel (row i, column j) covers level-0
    x in [j·d, (j+1)·d) and y in [i·d, (i+1)·d); the mask's top-left corner is the slide's.
  - `classes`: pixel value -> class name, mapped through `labels.classes` / `labels.aliases`. A
    value that is not listed (or listed as null) is *unannotated*: its pixels are labelled like
    any pixel no annotation covers (`labels.unannotated` / `labels.outside_tissue`). Leave 0 out
    when 0 means "not annotated"; list it (`"0": "Background"`) when it means background.

Why a sidecar rather than inferring the downsample from the slide/mask size ratio: the file is
self-describing and loads without opening the slide, and a ratio inferred from sizes is ambiguous
when pyramid levels round odd sizes or a mask is padded or cropped. `stedm check-data` checks
that mask size x downsample matches the slide's level-0 size.

Rasterising samples the mask at each output pixel's centre (nearest neighbour): exact, cheap, and
no polygons are traced, so nothing is lost to contour simplification.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stedm.config import LabelsConfig
from stedm.data.annotations import AnnotationError, Annotations, unknown_class_error

log = logging.getLogger(__name__)

UNANNOTATED = 255  # class indices are 0..253 (labels.classes holds at most 254 names)
MAX_CODE = 65535  # 16-bit masks at most
SIDECAR_EXAMPLE = '{"downsample": 16, "classes": {"1": "Tumor"}}'


@dataclass
class MaskAnnotations(Annotations):
    """A slide's label mask as class indices; `rasterize` samples it (see the module docstring).

    Attributes:
        label: (h, w) uint8 class index per mask pixel, `UNANNOTATED` where no class is given.
        downsample: level-0 pixels per mask pixel.
        sidecar: the JSON sidecar that describes the mask.
    """

    label: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8), repr=False)
    downsample: float = 1.0
    sidecar: Path | None = None

    @property
    def mask_size(self) -> tuple[int, int]:
        """(width, height) of the mask in pixels."""
        return int(self.label.shape[1]), int(self.label.shape[0])

    def rasterize(
        self,
        x0: float,
        y0: float,
        width_px: int,
        height_px: int,
        scale: float,
        fill: int | np.ndarray,
    ) -> np.ndarray:
        """Class-index image of a region (same contract as `Annotations.rasterize`)."""
        if isinstance(fill, np.ndarray):
            out = np.array(fill, dtype=np.uint8, copy=True)
        else:
            out = np.full((height_px, width_px), fill, dtype=np.uint8)
        h, w = self.label.shape
        # mask pixel under each output pixel centre; monotone, so the valid ones are contiguous
        cols = np.floor((x0 + (np.arange(width_px) + 0.5) * scale) / self.downsample).astype(
            np.int64
        )
        rows = np.floor((y0 + (np.arange(height_px) + 0.5) * scale) / self.downsample).astype(
            np.int64
        )
        c_ok, r_ok = (
            np.flatnonzero((cols >= 0) & (cols < w)),
            np.flatnonzero((rows >= 0) & (rows < h)),
        )
        if c_ok.size == 0 or r_ok.size == 0:
            return out
        (c0, c1), (r0, r1) = (c_ok[0], c_ok[-1] + 1), (r_ok[0], r_ok[-1] + 1)
        sample = self.label[rows[r0:r1, None], cols[None, c0:c1]]
        np.copyto(out[r0:r1, c0:c1], sample, where=sample != UNANNOTATED)
        return out


def _read_sidecar(path: Path, sidecar: Path) -> tuple[float, dict[int, str | None]]:
    if not sidecar.is_file():
        raise AnnotationError(
            path,
            f"label mask without its sidecar {sidecar.name}",
            f"write {sidecar} describing the mask, e.g. {SIDECAR_EXAMPLE} "
            "(downsample = level-0 pixels per mask pixel)",
        )
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            sidecar, f"not valid JSON ({exc})", f"write e.g. {SIDECAR_EXAMPLE}"
        ) from exc
    downsample = data.get("downsample") if isinstance(data, dict) else None
    classes = data.get("classes") if isinstance(data, dict) else None
    if (
        isinstance(downsample, bool)
        or not isinstance(downsample, int | float)
        or not downsample > 0
    ):
        raise AnnotationError(
            sidecar,
            f"'downsample' must be a positive number, got {downsample!r}",
            f"give level-0 pixels per mask pixel, e.g. {SIDECAR_EXAMPLE}",
        )
    if not isinstance(classes, dict):
        raise AnnotationError(
            sidecar,
            "'classes' must map pixel values to class names",
            f"write e.g. {SIDECAR_EXAMPLE}",
        )
    codes: dict[int, str | None] = {}
    for key, name in classes.items():
        try:
            code = int(key)
        except ValueError:
            code = -1
        if not 0 <= code <= MAX_CODE or not (name is None or isinstance(name, str)):
            raise AnnotationError(
                sidecar,
                f"classes entry {key!r}: {name!r} is not pixel value -> class name",
                f"keys are pixel values 0..{MAX_CODE} as strings, values class names or null",
            )
        codes[code] = name
    return float(downsample), codes


def _read_image(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            mask = tifffile.imread(path, key=0)  # level 0 if the mask is a pyramid
        else:
            from PIL import Image

            # a mask of a large slide can exceed PIL's decompression-bomb limit legitimately
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as image:
                    mask = np.asarray(image)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Exception as exc:  # noqa: BLE001 - any decoder error means an unreadable mask
        raise AnnotationError(
            path, f"cannot read the label mask ({exc})", "write it as a single-channel PNG or TIFF"
        ) from exc
    if mask.ndim == 3 and mask.shape[2] in (3, 4) and (mask[..., :3] == mask[..., :1]).all():
        mask = mask[..., 0]  # grey stored as RGB
    if mask.ndim != 2 or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        raise AnnotationError(
            path,
            f"a label mask must be one channel of integer class codes, got {mask.dtype} "
            f"{mask.shape}",
            "save class codes as an 8/16-bit greyscale or palette image",
        )
    mask = mask.astype(np.uint8) if mask.dtype == bool else mask
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > MAX_CODE):
        raise AnnotationError(
            path, f"pixel values outside 0..{MAX_CODE}", "store class codes as 8 or 16-bit values"
        )
    return mask


def load_label_mask(path: Path, labels: LabelsConfig) -> MaskAnnotations:
    """Load a label mask and its JSON sidecar (see the module docstring).

    Raises:
        AnnotationError: missing or malformed sidecar, unreadable or multi-channel mask, or a
            class name the labels config does not map (naming the sidecar).
    """
    path = Path(path)
    sidecar = path.with_suffix(".json")
    downsample, codes = _read_sidecar(path, sidecar)
    unknown: Counter[str] = Counter()
    index: dict[int, int] = {}
    for code, name in codes.items():
        if name is None:
            continue
        cls = labels.class_index(name)
        if cls is None:
            unknown[name] += 1
        else:
            index[code] = cls
    if unknown:
        raise unknown_class_error(sidecar, unknown, labels)
    mask = _read_image(path)
    top = int(mask.max()) if mask.size else 0
    lut = np.full(max(top, max(index, default=0)) + 1, UNANNOTATED, dtype=np.uint8)
    for code, cls in index.items():
        lut[code] = cls
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=lut.size))
    # values listed as null are unannotated on purpose; 0 is the usual "not annotated"
    unlisted = [int(c) for c in present if int(c) not in codes and c != 0]
    if unlisted:
        log.warning(
            "%s: pixel values %s are not in %s; they stay unannotated", path, unlisted, sidecar.name
        )
    return MaskAnnotations(
        path,
        [],
        n_features=int(sum(1 for c in present if int(c) in index)),
        n_skipped=len(unlisted),
        label=lut[mask],
        downsample=downsample,
        sidecar=sidecar,
    )
