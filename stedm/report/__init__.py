"""Report stage: the paper's tables, figures and a one-screen summary of a workflow run.

- `tables`: generation quality, segmentation per budget x arm, the headline gap closed (CSV + Markdown).
- `figures`: per-patient Dice strip plot, synthetic samples, training curves, prediction overlays.
- `build`: `stedm report`, everything above plus `report.md` and an MLflow run "report".
"""
