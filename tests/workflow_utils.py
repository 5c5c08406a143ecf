"""Run the real Snakemake CLI on the repository's Snakefile in a scratch working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str, config: dict | None = None, timeout: int = 1800):
    """Run snakemake with the venv on PATH; returns the CompletedProcess (text output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    if config is not None:
        path = workdir / "test_config.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(path)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
