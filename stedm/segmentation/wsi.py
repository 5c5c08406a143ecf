"""Whole-slide inference: overlapping windows over the tissue, blended, streamed in row strips.

The slide is predicted at the model's working resolution (`tile_mpp`, the tiles' µm/px) on a grid
of `tile` px windows with stride `round(tile · (1 − overlap))`; the last window of each row and
column is moved flush with the slide edge, so every pixel is covered and no window reads past the
slide (except on a slide smaller than one window). Windows whose footprint holds no tissue pixel
of the thumbnail mask are skipped; pixels no window covers are predicted background.

Blending: each window's softmax probabilities are multiplied by a Gaussian weight window (σ =
tile/8, as nnU-Net: predictions near a window's border see less context) and summed; the class
with the largest sum wins — dividing by the summed weights would not change the argmax, so only
the C weighted sums are kept. Pixels covered by one window only still get that window's vote (the
weight is floored at 1e-3).

Memory is bounded by the slide's *width*: windows are processed in row order and the sums live in
a rolling buffer of `tile + stride` rows (C × (tile + stride) × width float32, ≈ 0.36 GB for a
50,000 px wide slide, 512 px windows, 25 % overlap and 2 classes); rows above the current window
row are final and handed to the caller as boolean foreground strips, then dropped. Reads are one
OpenSlide region per run of neighbouring tissue windows (split at `max_read_px`), prefetched on a
background thread while the model runs (OpenSlide releases the GIL), and windows are batched
across rows, so the model sees full batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from stedm.data.slide import Slide

log = logging.getLogger(__name__)

# (images (n, 3, T, T) in [-1, 1] on the device, windows (n, 2) int64 (x, y) in working px)
#   -> logits (n, C, T, T)
Predictor = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def model_predictor(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> Predictor:
    """Wrap a segmentation model (eval mode, on its device) as a Predictor; windows are ignored."""

    def predict(images: torch.Tensor, windows: np.ndarray) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(images)

    return predict


def window_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Window origins along one axis: 0, stride, … and a last one flush with the edge."""
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - tile + 1, stride, dtype=np.int64)
    return starts if starts[-1] == length - tile else np.append(starts, length - tile)


def blend_window(tile: int, sigma_scale: float = 1 / 8, floor: float = 1e-3) -> np.ndarray:
    """(tile, tile) float32 Gaussian weight, 1 at the centre, at least `floor` at the corners."""
    centre = (np.arange(tile, dtype=np.float64) - (tile - 1) / 2) / (sigma_scale * tile)
    g = np.exp(-0.5 * centre**2)
    return np.maximum(np.outer(g, g) / g.max() ** 2, floor).astype(np.float32)


def window_tissue(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, tile: int, scale: float) -> np.ndarray:
    """(len(ys), len(xs)) bool: any tissue pixel of `mask` under each window's footprint.

    Args:
        mask: the thumbnail tissue mask.
        scale: mask pixels per working pixel.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(starts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(starts * scale), 0, size).astype(np.int64)
        hi = np.clip(np.ceil((starts + tile) * scale), 0, size).astype(np.int64)
        return lo, np.maximum(hi, np.minimum(lo + 1, size))  # at least one mask pixel when inside

    x0, x1 = bounds(xs, w)
    y0, y1 = bounds(ys, h)
    count = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return count > 0


class SlidePrediction:
    """Iterate a slide's predicted foreground as row strips: `for y0, fg in SlidePrediction(...)`.

    Each item is (first row, (h, width) bool foreground) at the working resolution; the strips
    cover rows 0 … height − 1 in order. After iteration, `n_windows`, `seconds` (wall time),
    `model_seconds` (model call incl. softmax and transfer) and `read_seconds` (slide reads, on
    the prefetch thread) describe the run.

    Args:
        slide: the open slide.
        predictor: the model (see `Predictor`).
        mpp: working µm/px (the model's tile µm/px).
        tile: window size in px.
        overlap: fraction of the window shared with its neighbour, in [0, 1).
        tissue: thumbnail tissue mask; tissue_mpp its µm/px. None = every window is predicted.
        foreground: output classes that count as foreground; n_classes the model's outputs.
        batch_size: windows per model call.
        device: where the images go before the predictor sees them.
    """

    def __init__(
        self, slide: Slide, predictor: Predictor, *, mpp: float, tile: int, overlap: float,
        tissue: np.ndarray | None, tissue_mpp: float | None, foreground: Sequence[int], n_classes: int,
        batch_size: int = 16, device: str | torch.device = "cpu", max_read_px: int = 8192,
        progress: bool = True, desc: str = "infer",
    ):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.slide, self.predictor, self.mpp, self.tile = slide, predictor, float(mpp), int(tile)
        self.stride = max(1, round(tile * (1.0 - overlap)))
        self.width, self.height = slide.size_at(mpp)
        self.scale0 = self.mpp / slide.mpp  # level-0 px per working px
        self.xs = window_starts(self.width, tile, self.stride)
        self.ys = window_starts(self.height, tile, self.stride)
        if tissue is None:
            self.has_tissue = np.ones((self.ys.size, self.xs.size), dtype=bool)
        else:
            self.has_tissue = window_tissue(tissue, self.xs, self.ys, tile, self.mpp / float(tissue_mpp))
        self.foreground, self.n_classes = tuple(int(c) for c in foreground), int(n_classes)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.max_read_px, self.progress, self.desc = int(max_read_px), progress, desc
        self.weight = torch.from_numpy(blend_window(tile)).to(self.device)
        self.n_windows = int(self.has_tissue.sum())
        self.n_windows_total = int(self.has_tissue.size)
        self.seconds = self.read_seconds = self.model_seconds = 0.0
        self._buffer_rows = tile + self.stride
        self._acc = np.zeros((self.n_classes, self._buffer_rows, self.width), dtype=np.float32)
        self._top = 0

    # -- reading ----------------------------------------------------------------------------
    def _runs(self, j: int) -> list[np.ndarray]:
        """Runs of neighbouring tissue windows of window row j, each at most max_read_px wide."""
        cols = np.flatnonzero(self.has_tissue[j])
        if cols.size == 0:
            return []
        per_run = max(1, (self.max_read_px - self.tile) // self.stride + 1)
        runs = []
        for run in np.split(cols, np.flatnonzero(np.diff(cols) != 1) + 1):
            runs += [run[k : k + per_run] for k in range(0, run.size, per_run)]
        return runs

    def _read_row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """The tissue windows of window row j: (n, T, T, 3) uint8 and their (x, y) origins."""
        t0 = time.perf_counter()
        y, t = int(self.ys[j]), self.tile
        images, origins = [], []
        for run in self._runs(j):
            x0 = int(self.xs[run[0]])
            width = int(self.xs[run[-1]]) + t - x0
            region = self.slide.read_region_mpp(x0 * self.scale0, y * self.scale0, (width, t), self.mpp)
            offsets = self.xs[run] - x0
            images.append(np.stack([region[:, o : o + t] for o in offsets]))
            origins.append(np.stack([self.xs[run], np.full(run.size, y)], axis=1))
        self.read_seconds += time.perf_counter() - t0
        return np.concatenate(images), np.concatenate(origins)

    # -- blending ---------------------------------------------------------------------------
    def _decide(self, block: np.ndarray) -> np.ndarray:
        if self.foreground == (1,) and self.n_classes == 2:
            return block[1] > block[0]  # uncovered: 0 > 0 is background
        covered = block.sum(axis=0) > 0
        return np.isin(block.argmax(axis=0), self.foreground) & covered

    def _finalize(self, until: int) -> Iterator[tuple[int, np.ndarray]]:
        """Hand out rows [top, until) (no later window reaches them) and roll the buffer."""
        until = min(until, self.height)
        while self._top < until:
            n = min(until - self._top, self._buffer_rows)
            yield self._top, self._decide(self._acc[:, :n])
            self._acc[:, : self._buffer_rows - n] = self._acc[:, n:]
            self._acc[:, self._buffer_rows - n :] = 0.0
            self._top += n

    def _predict(self, images: np.ndarray, origins: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        t0 = time.perf_counter()
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        with torch.no_grad():
            logits = self.predictor(x, origins)
            probs = (logits.float().softmax(dim=1) * self.weight).cpu().numpy()
        self.model_seconds += time.perf_counter() - t0
        for p, (wx, wy) in zip(probs, origins.tolist(), strict=True):
            h, w = min(self.tile, self.height - wy), min(self.tile, self.width - wx)
            if wy + h > self._top + self._buffer_rows:
                yield from self._finalize(wy)
            r = wy - self._top
            self._acc[:, r : r + h, wx : wx + w] += p[:, :h, :w]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        start = time.perf_counter()
        rows = [j for j in range(self.ys.size) if self.has_tissue[j].any()]
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        n_pending = 0
        bar = tqdm(total=self.n_windows, desc=self.desc, unit="win", mininterval=2.0,
                   disable=None if self.progress else True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            futures = collections.deque(pool.submit(self._read_row, j) for j in rows[:2])
            next_row = 2
            while futures:
                images, origins = futures.popleft().result()
                if next_row < len(rows):
                    futures.append(pool.submit(self._read_row, rows[next_row]))
                    next_row += 1
                pending.append((images, origins))
                n_pending += len(images)
                while n_pending >= self.batch_size or (not futures and n_pending):
                    all_images = np.concatenate([p[0] for p in pending])
                    all_origins = np.concatenate([p[1] for p in pending])
                    k = min(self.batch_size, n_pending)
                    yield from self._predict(all_images[:k], all_origins[:k])
                    bar.update(k)
                    pending = [(all_images[k:], all_origins[k:])] if n_pending > k else []
                    n_pending -= k
        bar.close()
        yield from self._finalize(self.height)
        self.seconds = time.perf_counter() - start
        log.debug("%d windows in %.1f s (reading %.1f s)", self.n_windows, self.seconds, self.read_seconds)


def overlay_grid(width: int, height: int, out_w: int, out_h: int) -> tuple[np.ndarray, np.ndarray]:
    """Working-resolution column and row sampled by each overlay pixel (nearest, pixel centres)."""
    cols = np.minimum(((np.arange(out_w) + 0.5) * width / out_w).astype(np.int64), width - 1)
    rows = np.minimum(((np.arange(out_h) + 0.5) * height / out_h).astype(np.int64), height - 1)
    return cols, rows


def overlay_mpp(slide: Slide, mpp: float, max_px: int = 1024) -> float:
    """µm/px of an overlay whose longer side is at most `max_px` (never finer than `mpp`)."""
    longest_um = max(slide.dimensions) * slide.mpp
    return max(float(mpp), longest_um / max_px)
