"""Generation metrics: FID/IS (Inception), style fidelity (stain statistics), layout fidelity.

- `fid`: FID and IS via torchmetrics with the standard Inception weights from a local file only;
  without them the result is a "not computed" status, never a number from a random network.
- `style_fidelity`: does a synthetic image carry the stain style of the slide it was conditioned
  on? Nearest style slide by HED/Lab statistics, top-1 accuracy against chance.
- `layout_fidelity`: Dice between a synthetic image's conditioning layout and what a real-data
  segmentation model sees in it.
- `generation`: `stedm evaluate-generation`, all three for one budget's synthetic set.

The stages read the `report` config section (`stedm.config.ReportConfig`) with `load_stage_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stedm.config import Config, ReportConfig, load_config

__all__ = ["ReportConfig", "load_stage_config"]


def load_stage_config(source: str | Path | dict[str, Any] | None) -> tuple[Config, ReportConfig]:
    """The typed config and its `report` section."""
    config = load_config(source)
    return config, config.report
