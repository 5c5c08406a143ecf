"""Tiling stage: slide + annotations -> per-slide zarr tile store (see docs/contracts.md)."""

from stedm.tiling.store import TileStore, open_tile_store

__all__ = ["TileStore", "open_tile_store"]
