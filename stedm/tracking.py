"""Experiment tracking with MLflow: one SQLite database under the results folder.

MLflow's default URI is relative to the *current* directory and each process otherwise makes a
network lookup for telemetry; both are pinned here. The database and experiment are created once
(`stedm init-tracking`, the first rule of the workflow) because parallel jobs racing on the
first schema migration corrupt it. With `tracking.enabled: false` every call is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stedm.config import Config, load_config
from stedm.io import write_json

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri(config: Config) -> str:
    """The configured URI, or an absolute sqlite URI for <results_dir>/mlflow.db."""
    if config.tracking.uri:
        return config.tracking.uri
    db = Path(config.results_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def _mlflow(config: Config):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    return mlflow


def init_tracking(config: Config) -> str | None:
    """Create the database and experiment once; return the experiment id (None when disabled)."""
    if not config.tracking.enabled:
        return None
    Path(config.results_dir).mkdir(parents=True, exist_ok=True)
    mlflow = _mlflow(config)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        # Artifacts next to the database, not MLflow's default ./mlruns in whatever folder the
        # job happens to run in.
        artifacts = (Path(config.results_dir).resolve() / "mlartifacts").as_uri()
        return mlflow.create_experiment(config.tracking.experiment, artifact_location=artifacts)
    return experiment.experiment_id


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            # MLflow keys allow only alphanumerics, _ - . / and space (arm names contain '+')
            key = re.sub(r"[^\w\-./ ]", "_", str(k))
            _flatten(f"{prefix}.{key}" if prefix else key, v, out)
    else:
        out[prefix] = value


class Run:
    """A thin handle around an active MLflow run (or nothing, when tracking is off)."""

    def __init__(self, mlflow: Any | None, run_id: str | None):
        self._mlflow = mlflow
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)


@contextlib.contextmanager
def start_run(
    config: Config,
    name: str,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    parent: str | None = None,
) -> Iterator[Run]:
    """Start a run named `name` with flattened `params`; nested under the run named `parent`.

    The parent run (e.g. "budget~6/seed~0") is looked up by name and created when missing, so
    jobs in separate processes are grouped without passing ids around.
    """
    if not config.tracking.enabled:
        yield Run(None, None)
        return
    mlflow = _mlflow(config)
    experiment_id = init_tracking(config)
    parent_id = None
    if parent:
        found = mlflow.search_runs(
            experiment_ids=[experiment_id],
            filter_string=f"tags.mlflow.runName = '{parent}' and tags.stedm_parent = 'true'",
            output_format="list",
        )
        if found:
            parent_id = found[0].info.run_id
        else:
            with mlflow.start_run(experiment_id=experiment_id, run_name=parent) as p:
                mlflow.set_tag("stedm_parent", "true")
                parent_id = p.info.run_id
    flat: dict[str, Any] = {}
    _flatten("", params or {}, flat)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent_id) as run:
        if flat:
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        if tags:
            mlflow.set_tags(tags)
        yield Run(mlflow, run.info.run_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")
    parser.add_argument("--out", required=True, type=Path, help="marker JSON written when ready")


def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    experiment_id = init_tracking(config)
    uri = tracking_uri(config) if config.tracking.enabled else None
    write_json(args.out, {"enabled": config.tracking.enabled, "uri": uri, "experiment_id": experiment_id})
    log.info("tracking %s (experiment id %s)", uri or "disabled", experiment_id)
