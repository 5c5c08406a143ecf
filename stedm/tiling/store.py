"""The per-slide tile store (zarr v3 group; format in docs/contracts.md): writer and reader.

The writer creates every array up front (the tile count is known from the tissue mask before
any pixel is read), takes tiles row by row and writes only whole chunks, so memory does not grow
with the slide and no chunk is rewritten.

Chunks are encoded and written by a small thread pool straight into zarr v3's on-disk layout
(key `c.<i>.0.0.0` per the array's chunk-key encoding, bytes -> Blosc; edge chunk padded with
the fill value), byte-identical to what zarr itself writes: zarr-python spends ~0.6 ms of
GIL-bound Python per chunk, more than OpenSlide needs to decode a tile, and Blosc and file writes
release the GIL, so the pool overlaps them with decoding. zarr writes the metadata and reads the
store; an array whose codecs differ from ours falls back to zarr's own writes.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec

from stedm.errors import StedmError

# Lossless compression gains little on stained tissue (~13 % on a real IHC image) and costs as
# much CPU as decoding the slide: zstd level 1 + bitshuffle is 2.5x faster than level 5 for a
# 1.5 % larger store; lz4 is faster still but saves almost nothing.
BLOSC = {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
WRITE_THREADS = 2
MAX_PENDING_BYTES = 32 << 20  # encoded-but-unwritten chunks held at most


def _compressor() -> BloscCodec:
    return BloscCodec(**BLOSC)


class _ChunkWriter:
    """Encode and store whole chunks of one zarr array from a thread pool."""

    def __init__(
        self, array: zarr.Array, store_dir: Path, fill: int, pool: concurrent.futures.Executor
    ):
        self.array, self.fill, self.pool = array, fill, pool
        self.dir = store_dir / array.path
        self.chunk = array.chunks[0]
        meta = array.metadata
        codecs = tuple(meta.codecs)
        self.direct = (
            len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and isinstance(codecs[1], BloscCodec)
            and codecs[1].cname.value == BLOSC["cname"]
            and codecs[1].clevel == BLOSC["clevel"]
            and codecs[1].shuffle.value == BLOSC["shuffle"]
            and codecs[1].typesize == 1
        )
        self.codec = numcodecs.Blosc(BLOSC["cname"], BLOSC["clevel"], numcodecs.Blosc.BITSHUFFLE)
        self.key = meta.chunk_key_encoding.encode_chunk_key
        self.zeros = (0,) * (len(array.shape) - 1)

    def _store(self, index: int, block: np.ndarray) -> None:
        if len(block) < self.chunk:  # the edge chunk is stored full size, padded with the fill
            pad = np.full((self.chunk - len(block), *block.shape[1:]), self.fill, dtype=block.dtype)
            block = np.concatenate([block, pad])
        data = self.codec.encode(np.ascontiguousarray(block))
        (self.dir / self.key((index, *self.zeros))).write_bytes(data)

    def submit(self, start: int, data: np.ndarray) -> list[concurrent.futures.Future]:
        """Write tiles start..start+len(data); start is chunk-aligned, data whole chunks or the end."""
        if not self.direct:
            self.array[start : start + len(data)] = data
            return []
        return [
            self.pool.submit(self._store, (start + k) // self.chunk, data[k : k + self.chunk])
            for k in range(0, len(data), self.chunk)
        ]


class TileStoreWriter:
    """Write one slide's tiles into a new zarr v3 group at `path`.

    Usage: create with the tile count, `write_index(coords, tissue)`, then `append(images,
    labels)` once per row in tile order, then `close(attrs)` (or `abort()` on failure).
    """

    def __init__(
        self, path: str | Path, n_tiles: int, tile_size: int, *, chunk_tiles: int, labelled: bool
    ) -> None:
        self.path = Path(path)
        self.n_tiles, self.labelled = n_tiles, labelled
        self.chunk_tiles = min(max(1, chunk_tiles), max(1, n_tiles))
        self.group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        chunk, t = self.chunk_tiles, tile_size
        # "." keys (c.12.0.0.0): one flat folder of chunk files instead of three nested folders
        # per chunk; creating and deleting folders costs as much as writing a tile.
        keys = {"name": "default", "separator": "."}
        self.images = self.group.create_array(
            "images",
            shape=(n_tiles, t, t, 3),
            chunks=(chunk, t, t, 3),
            dtype="uint8",
            compressors=_compressor(),
            fill_value=255,
            chunk_key_encoding=keys,
        )
        self.labels = None
        if labelled:
            self.labels = self.group.create_array(
                "labels",
                shape=(n_tiles, t, t),
                chunks=(chunk, t, t),
                dtype="uint8",
                compressors=_compressor(),
                fill_value=0,
                chunk_key_encoding=keys,
            )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            WRITE_THREADS, thread_name_prefix="zarr-chunk"
        )
        self._writers = [_ChunkWriter(self.images, self.path, 255, self._pool)]
        if self.labels is not None:
            self._writers.append(_ChunkWriter(self.labels, self.path, 0, self._pool))
        tile_bytes = t * t * (4 if labelled else 3)
        self._max_pending = max(2 * WRITE_THREADS, MAX_PENDING_BYTES // (tile_bytes * chunk))
        self._futures: collections.deque[concurrent.futures.Future] = collections.deque()
        self._written = 0  # tiles handed to the chunk writers
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._n_pending = 0

    def write_index(self, coords: np.ndarray, tissue: np.ndarray) -> None:
        """Write the (N, 2) int64 level-0 (x, y) corners and (N,) float32 tissue fractions."""
        self.group.create_array(
            "coords", data=np.asarray(coords, dtype=np.int64), compressors=_compressor()
        )
        self.group.create_array(
            "tissue", data=np.asarray(tissue, dtype=np.float32), compressors=_compressor()
        )

    def _flush(self, final: bool = False) -> None:
        n = self._n_pending if final else self._n_pending // self.chunk_tiles * self.chunk_tiles
        if n == 0:
            return
        if len(self._pending) == 1:
            images, labels = self._pending[0]
        else:
            images = np.concatenate([im for im, _ in self._pending])
            labels = np.concatenate([lb for _, lb in self._pending]) if self.labelled else None
        self._futures.extend(self._writers[0].submit(self._written, images[:n]))
        if labels is not None:
            self._futures.extend(self._writers[1].submit(self._written, labels[:n]))
        self._written += n
        self._pending = (
            [(images[n:], None if labels is None else labels[n:])] if n < len(images) else []
        )
        self._n_pending = len(images) - n
        while len(self._futures) > self._max_pending:  # bound memory; surfaces write errors
            self._futures.popleft().result()

    def append(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add the next tiles (in store order); whole chunks are written in the background."""
        if self.labelled and labels is None:
            raise ValueError("this store has labels: pass them with the images")
        self._pending.append((images, labels))
        self._n_pending += len(images)
        self._flush()

    def close(self, attrs: dict[str, Any]) -> None:
        """Write the remaining tiles, wait for all writes, then set the group attributes."""
        try:
            self._flush(final=True)
            while self._futures:
                self._futures.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._written != self.n_tiles:
            raise RuntimeError(
                f"tile store {self.path}: wrote {self._written} of {self.n_tiles} tiles"
            )
        self.group.update_attributes(attrs)  # one metadata write, not one per key

    def abort(self) -> None:
        """Stop writing without finishing (the caller removes the directory)."""
        self._pending, self._n_pending = [], 0
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


class TileStore:
    """Read-only view of a tile store.

    Attributes:
        path: the store directory.
        images: zarr array (N, T, T, 3) uint8.
        labels: zarr array (N, T, T) uint8, or None for an unannotated slide.
        coords: (N, 2) int64 level-0 (x, y) of each tile's top-left corner (in memory).
        tissue: (N,) float32 tissue fraction of each tile (in memory).
        attrs: the group attributes (see docs/contracts.md).
        n: number of tiles.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StedmError(f"tile store not found: {self.path} (run `stedm tile` for this slide)")
        try:
            self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            self.images = self.group["images"]
            self.labels = self.group.get("labels", None)
            self.coords = np.asarray(self.group["coords"][:])
            self.tissue = np.asarray(self.group["tissue"][:])
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise StedmError(
                f"{self.path} is not a complete tile store ({exc}); delete it and rerun `stedm tile`"
            ) from exc
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.n = int(self.images.shape[0])

    @property
    def tile_size(self) -> int:
        return int(self.images.shape[1])

    def read(
        self, indices: int | Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Tiles by index, in the order given (duplicates allowed).

        Reads each needed chunk once: indices are de-duplicated and sorted for zarr, then put
        back in the requested order. A contiguous range is read as one slice.

        Returns:
            images (n, T, T, 3) uint8 and labels (n, T, T) uint8 (None when unannotated).
        """
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"tile index out of range [0, {self.n}) in {self.path}")
        unique, inverse = np.unique(idx, return_inverse=True)
        if unique.size and unique[-1] - unique[0] + 1 == unique.size:
            sel: Any = slice(int(unique[0]), int(unique[-1]) + 1)
            images = self.images[sel]
            labels = None if self.labels is None else self.labels[sel]
        else:
            images = self.images.get_orthogonal_selection((unique,))
            labels = (
                None if self.labels is None else self.labels.get_orthogonal_selection((unique,))
            )
        if unique.size != idx.size or not np.array_equal(unique, idx):
            images = images[inverse]
            labels = None if labels is None else labels[inverse]
        return images, labels

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n={self.n}, labelled={self.labels is not None})"


def open_tile_store(path: str | Path) -> TileStore:
    """Open a tile store written by `stedm tile` (read-only)."""
    return TileStore(path)


def tile_store_paths(tiles_dir: str | Path, slides: list[str]) -> list[Path]:
    """`<tiles_dir>/<slide>.zarr` for each slide; a StedmError when any store is missing."""
    paths = [Path(tiles_dir) / f"{s}.zarr" for s in slides]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise StedmError(f"tile stores missing: {missing[:3]}{more}; run the tiling stage")
    return paths


def store_fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies a store's content cheaply: its attributes (source and annotation hashes,
    tiling, tile count for tile stores; model hash and settings for synthetic stores)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)
