"""Segmentation stage: train a U-Net per (annotation budget, arm, seed), evaluate on whole slides.

- `model`: smp U-Net presets (`demo`, `paper`), save/load, local encoder weights.
- `data`: real/synthetic tile mixing per batch, stain augmentation, validation tiles.
- `train`: `stedm train-seg` (shared training loop, best-validation-Dice weights).
- `wsi`: sliding-window whole-slide inference with blending, streamed in row strips.
- `metrics`: Dice/IoU from confusion counts, per-patient pooling, aggregates.
- `evaluate`: `stedm evaluate-seg` (per-slide and per-patient metrics.json, overlays).
"""
