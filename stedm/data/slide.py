"""Whole-slide images read in µm/px: `open_slide(path).read_region_mpp(x, y, size, mpp)`.

A thin wrapper around OpenSlide that never speaks in pyramid "levels" or "magnification": the
caller asks for a region at a physical resolution, and the wrapper picks the pyramid level and
resamples. Rules, and why:

- Level choice: the coarsest level whose µm/px is <= the target (within 0.1 %), so we read as
  few pixels as possible but never upsample when a finer level exists.
- Exact match: when that level's µm/px equals the target (within 0.1 %, which absorbs the
  rounding of odd level sizes, e.g. 20001 -> 10000 px), pixels are copied, not resampled.
- Otherwise area (box) downsampling with sub-pixel placement (PIL `resize(box=...)`): every
  output pixel averages the source pixels whose centres fall inside its footprint.
- Windows are read at integral level coordinates: OpenSlide interpolates when asked for a
  level-0 location that falls between the pixels of a coarser level.
- RGBA -> RGB over white: OpenSlide returns transparent pixels outside the scanned area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stedm.errors import StedmError

SUPPORTED_FORMATS = (
    "Aperio (.svs, .tif), DICOM (.dcm), Hamamatsu (.ndpi, .vms, .vmu), Leica (.scn), "
    "MIRAX (.mrxs), Philips (.tiff), Sakura (.svslide), Ventana (.bif, .tif), Zeiss (.czi), "
    "generic tiled pyramidal TIFF (.tif)"
)
MPP_TOLERANCE = 1e-3  # relative; a level within 0.1 % of the target counts as an exact match
MAX_WINDOW_PX = 4096  # thumbnails are assembled from windows of at most this many source px


@dataclass(frozen=True)
class ReadPlan:
    """Where to read one output region: a window at integral coordinates of one level.

    `box` is the output region inside the window in window pixels (for PIL's `resize(box=)`), or
    None when the window is copied as-is (exact level match).
    """

    level: int
    x: int  # window origin, level pixels
    y: int
    width: int  # window size, level pixels
    height: int
    out_size: tuple[int, int]  # (w, h) at the target µm/px
    box: tuple[float, float, float, float] | None


def _as_size(size_px: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size_px, int | np.integer):
        return int(size_px), int(size_px)
    w, h = size_px
    return int(w), int(h)


def rgba_to_rgb(image: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA PIL image -> (h, w, 3) uint8, composited over white (transparent -> white).

    Packs RGB in PIL (`tobytes('raw', 'RGB')`): ~7x faster than slicing a numpy RGBA array,
    which matters when tiling is as fast as decoding. The result may be read-only.
    """
    alpha = np.frombuffer(image.tobytes("raw", "A"), dtype=np.uint8)
    if alpha.size and alpha.min() < 255:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    w, h = image.size
    return np.frombuffer(image.tobytes("raw", "RGB"), dtype=np.uint8).reshape(h, w, 3)


def resample(window_rgb: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """Resample a window read for `plan` to its output size (a copy when the level matches)."""
    if plan.box is None:
        return np.array(window_rgb[: plan.out_size[1], : plan.out_size[0]])  # writable copy
    image = Image.fromarray(np.ascontiguousarray(window_rgb))
    # BOX = area average for downsampling; bilinear when upsampling beyond level 0.
    downsampling = (plan.box[2] - plan.box[0]) >= plan.out_size[0]
    method = Image.Resampling.BOX if downsampling else Image.Resampling.BILINEAR
    return np.array(image.resize(plan.out_size, method, box=plan.box))  # writable


class Slide:
    """An open whole-slide image addressed in level-0 pixels and µm/px.

    Attributes:
        path: the slide file.
        mpp: level-0 µm/px (from the file, or the override).
        dimensions: level-0 (width, height) in pixels.
    """

    def __init__(self, path: str | Path, mpp_override: float | None = None) -> None:
        import openslide  # imported here: the C library loads only when a slide is opened

        self.path = Path(path)
        if not self.path.is_file():
            raise StedmError(f"slide not found: {self.path} (check slide_path in the manifest)")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (
            openslide.OpenSlideError,
            openslide.OpenSlideUnsupportedFormatError,
            OSError,
        ) as exc:
            raise StedmError(
                f"cannot open {self.path} as a whole-slide image (OpenSlide: {exc}); "
                f"supported formats: {SUPPORTED_FORMATS}"
            ) from exc
        if mpp_override is not None:
            if not mpp_override > 0:
                self._osr.close()
                raise StedmError(
                    f"{self.path}: µm/px override {mpp_override} must be a positive number"
                )
            self.mpp = float(mpp_override)
        else:
            raw = self._osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
            try:
                self.mpp = float(raw) if raw is not None else 0.0
            except ValueError:
                self.mpp = 0.0
            if not self.mpp > 0:
                self._osr.close()
                raise StedmError(
                    f"{self.path} records no µm/px; add an `mpp` value for this slide in the "
                    "manifest (or pass --mpp)"
                )
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)
        self._downsamples = [float(d) for d in self._osr.level_downsamples]
        self._level_dims = [tuple(d) for d in self._osr.level_dimensions]
        self.vendor = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    # -- resolution bookkeeping -------------------------------------------------------------
    def best_level(self, mpp: float) -> int:
        """The coarsest level whose µm/px is <= `mpp` (level 0 when the target is finer)."""
        best = 0
        for level, ds in enumerate(self._downsamples):
            if self.mpp * ds <= mpp * (1 + MPP_TOLERANCE) and ds > self._downsamples[best]:
                best = level
        return best

    def plan(self, x0: float, y0: float, size_px: int | tuple[int, int], mpp: float) -> ReadPlan:
        """The level window to read for an output region at (x0, y0) level-0 px, `size_px` at `mpp`."""
        w, h = _as_size(size_px)
        level = self.best_level(mpp)
        ds = self._downsamples[level]
        factor = mpp / (self.mpp * ds)  # level pixels per output pixel
        lx, ly = x0 / ds, y0 / ds
        if abs(factor - 1) <= MPP_TOLERANCE:
            return ReadPlan(level, round(lx), round(ly), w, h, (w, h), None)
        margin = 0 if factor >= 1 else 1  # bilinear upsampling looks one pixel beyond the box
        ix, iy = math.floor(lx) - margin, math.floor(ly) - margin
        ix1 = math.ceil(lx + w * factor) + margin
        iy1 = math.ceil(ly + h * factor) + margin
        box = (lx - ix, ly - iy, lx - ix + w * factor, ly - iy + h * factor)
        return ReadPlan(level, ix, iy, ix1 - ix, iy1 - iy, (w, h), box)

    def read_window(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of `level` at integral level coordinates (outside the slide = white).

        May be read-only (see `rgba_to_rgb`).
        """
        ds = self._downsamples[level]
        # Level-0 location of an integral level pixel; exact for power-of-two pyramids.
        location = (round(x * ds), round(y * ds))
        return rgba_to_rgb(self._osr.read_region(location, level, (int(width), int(height))))

    # -- public reads ------------------------------------------------------------------------
    def read_region_mpp(
        self, x0: float, y0: float, size_px: int | tuple[int, int], mpp: float
    ) -> np.ndarray:
        """Read a region at a physical resolution.

        Args:
            x0, y0: top-left corner in level-0 pixels (may be fractional).
            size_px: output size in pixels, an int (square) or (width, height).
            mpp: output µm/px.

        Returns:
            (height, width, 3) uint8 RGB; pixels outside the slide are white.
        """
        plan = self.plan(x0, y0, size_px, mpp)
        window = self.read_window(plan.level, plan.x, plan.y, plan.width, plan.height)
        return resample(window, plan)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at `mpp` (at least 1 px each)."""
        w, h = self.dimensions
        return max(1, round(w * self.mpp / mpp)), max(1, round(h * self.mpp / mpp))

    def thumbnail_mpp(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` as (h, w, 3) uint8, assembled block-wise (bounded memory)."""
        tw, th = self.size_at(mpp)
        level = self.best_level(mpp)
        factor = max(1.0, mpp / (self.mpp * self._downsamples[level]))
        block = max(64, int(MAX_WINDOW_PX / factor))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        scale = mpp / self.mpp  # level-0 px per output px
        for by in range(0, th, block):
            for bx in range(0, tw, block):
                bw, bh = min(block, tw - bx), min(block, th - by)
                out[by : by + bh, bx : bx + bw] = self.read_region_mpp(
                    bx * scale, by * scale, (bw, bh), mpp
                )
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h} px at {self.mpp:g} µm/px, {self.vendor})"


def open_slide(path: str | Path, mpp_override: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: any format OpenSlide reads.
        mpp_override: level-0 µm/px to use instead of (or in the absence of) the file's own.

    Raises:
        StedmError: the file is missing, is not a slide OpenSlide can read, or records no µm/px
            and no override was given.
    """
    return Slide(path, mpp_override)
