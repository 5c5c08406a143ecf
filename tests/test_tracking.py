"""MLflow tracking: absolute SQLite store, runs grouped under a named parent, off switch."""

import mlflow

from stedm.config import load_config
from stedm.tracking import init_tracking, start_run, tracking_uri


def test_runs_grouped_under_parent(tmp_path):
    cfg = load_config({"results_dir": str(tmp_path / "results")})
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    exp = init_tracking(cfg)
    assert init_tracking(cfg) == exp  # idempotent
    params = {"stedm": {"lr": 0.1}, "arms": {"real+stedm": {"synthetic_fraction": 0.8}}}
    with start_run(cfg, "train", params=params, parent="budget~6/seed~0") as run:
        run.log_metrics({"loss": 0.5}, step=1)
    with start_run(cfg, "eval", parent="budget~6/seed~0") as run2:
        run2.log_metrics({"dice": 0.9, "nan": float("nan")})
    mlflow.set_tracking_uri(tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_ids=[exp], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"train", "eval", "budget~6/seed~0"}
    parent_id = by_name["budget~6/seed~0"].info.run_id
    assert by_name["train"].data.tags["mlflow.parentRunId"] == parent_id
    assert by_name["eval"].data.tags["mlflow.parentRunId"] == parent_id
    assert by_name["train"].data.params["stedm.lr"] == "0.1"
    assert by_name["train"].data.params["arms.real_stedm.synthetic_fraction"] == "0.8"
    assert by_name["train"].data.metrics["loss"] == 0.5
    assert "nan" not in by_name["eval"].data.metrics
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with start_run(cfg, "artifacts") as run3:
        run3.log_artifact(artifact)
    assert list((tmp_path / "results" / "mlartifacts").rglob("a.txt"))  # not ./mlruns


def test_disabled_is_a_no_op(tmp_path):
    cfg = load_config({"results_dir": str(tmp_path), "tracking": {"enabled": False}})
    assert init_tracking(cfg) is None
    with start_run(cfg, "x", params={"a": 1}) as run:
        run.log_metrics({"loss": 1.0})
    assert not (tmp_path / "mlflow.db").exists()
