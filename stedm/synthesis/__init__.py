"""Synthesis stage: style-query selection, CFG sampling, sharded generation and merging.

- `select`: `stedm select-styles`, the style-query table (one row per synthetic sample).
- `sampling`: DDIM / DPM-Solver++ with classifier-free guidance over style (batched) and rescale.
- `generate`: `stedm generate`, one shard of a budget's synthetic store (workflow mode), or
  images of your own layout in the style of any slide (`user`, user mode).
- `merge`: `stedm merge-synthetic`, shards -> `synthetic.zarr` + `preview.png`.
"""
