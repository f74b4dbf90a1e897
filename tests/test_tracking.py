"""tracking: the store lives at the repo root (DVC_ROOT), metrics go to the JSON file and the MLflow run alike."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from stages.tracking import report, store_root, tracking_uri, use_experiment


def test_store_root_is_dvc_root_when_dvc_runs_us(tmp_path: Path) -> None:
    assert store_root({"DVC_ROOT": str(tmp_path)}, Path("/elsewhere")) == tmp_path.resolve()
    assert store_root({}, tmp_path) == tmp_path.resolve()


def test_tracking_uri_defaults_to_sqlite_at_root_and_honours_the_env() -> None:
    assert tracking_uri({}, Path("/repo")) == "sqlite:////repo/mlflow.db"
    assert tracking_uri({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, Path("/repo")) == "http://127.0.0.1:5000"


def test_report_writes_the_file_and_the_run(tmp_path: Path) -> None:
    use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", tmp_path / "mlartifacts")
    with mlflow.start_run() as run:
        report({"loss": 1.5, "rows": 3}, tmp_path / "metrics" / "stage.json", prefix="stage")
    assert json.loads((tmp_path / "metrics" / "stage.json").read_text()) == {"loss": 1.5, "rows": 3}
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics == {"stage/loss": 1.5, "stage/rows": 3.0}
    assert logged.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
