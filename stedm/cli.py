"""`stedm <stage> ...`: one console command per pipeline stage.

Each stage lives in its own module exposing `add_arguments(parser)` and `run(args) -> None`; the
module is imported only when its stage runs, so `stedm tile` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from stedm.errors import StedmError

# stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "make-demo-cohort": ("stedm.data.demo", "generate the synthetic demo cohort (slides, GeoJSON, manifest)"),
    "tile": ("stedm.tiling.cli", "tile one slide (and its annotations) into a zarr store"),
    "split": ("stedm.data.splits", "write patient-level splits.json with nested budgets"),
    "check-data": ("stedm.data.check", "validate a manifest and its files; one line per problem, then a summary"),
    "import-catch": ("stedm.data.catch", "turn the public CATCH release into a manifest + QuPath GeoJSON"),
    "init-tracking": ("stedm.tracking", "create the MLflow database and experiment once"),
    "train-autoencoder": ("stedm.diffusion.train_autoencoder", "train the first-stage autoencoder"),
    "train-stedm": ("stedm.diffusion.train", "train one STEDM model for an annotation budget"),
    "train-seg": ("stedm.segmentation.train", "train one segmentation model for a budget, arm and seed"),
    "evaluate-seg": ("stedm.segmentation.evaluate", "whole-slide Dice/IoU of a segmentation model per test patient"),
    "select-styles": ("stedm.synthesis.select", "write a budget's style-query table (layouts x unseen styles)"),
    "generate": ("stedm.synthesis.generate", "generate synthetic tiles: one workflow shard, or your own layout"),
    "merge-synthetic": ("stedm.synthesis.merge", "merge generation shards into synthetic.zarr + preview.png"),
    "evaluate-generation": ("stedm.metrics.generation", "FID/IS, style and layout fidelity of a budget's synthetic set"),
    "report": ("stedm.report.build", "tables, figures and report.md from every stage's results"),
}


def _usage() -> str:
    lines = ["usage: stedm <stage> [options]   (stedm <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage '{stage}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    parser = argparse.ArgumentParser(prog=f"stedm {stage}", description=STAGES[stage][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    log = logging.getLogger("stedm")
    start = time.perf_counter()
    try:
        module.run(args)
    except StedmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("stage %s finished in %.1f s", stage, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
