"""tracking: the store lives at the repo root (DVC_ROOT), metrics go to the JSON file and the MLflow run alike."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import pytest

from finetune.tracking.adapter_run import adapter_run
from finetune.tracking.guard import absolute, verdict
from finetune.tracking.records import MAX_RUN_NAME, report, run_name, storable
from finetune.tracking.store import (
    TrackingConfig,
    is_tracking_server,
    store_lock,
    store_root,
    tracking_uri,
    use_experiment,
)
from finetune.tracking.ui import RUNS_VIEW, SWEEPS_VIEW, runs_page, save_runs_view


def test_store_root_is_dvc_root_when_dvc_runs_us(tmp_path: Path) -> None:
    assert store_root({"DVC_ROOT": str(tmp_path)}, Path("/elsewhere")) == tmp_path.resolve()
    assert store_root({}, tmp_path) == tmp_path.resolve()


def test_tracking_uri_defaults_to_sqlite_at_root_and_honours_the_env() -> None:
    assert tracking_uri({}, Path("/repo")) == "sqlite:////repo/mlflow.db"
    assert tracking_uri({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, Path("/repo")) == "http://127.0.0.1:5000"
    # a SQLite store is opened under a lock beside it (its first opening creates the tables: one process at a time)
    assert store_lock("sqlite:////repo/mlflow.db") == Path("/repo/mlflow.db.lock")
    assert store_lock("http://127.0.0.1:5000") is None and store_lock("postgresql://db/mlflow") is None


def test_report_writes_the_file_and_the_run(tmp_path: Path) -> None:
    use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", tmp_path / "mlartifacts")
    with mlflow.start_run() as run:
        report({"loss": 1.5, "rows": 3}, tmp_path / "metrics" / "stage.json", prefix="stage")
    assert json.loads((tmp_path / "metrics" / "stage.json").read_text()) == {"loss": 1.5, "rows": 3}
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics == {"stage/loss": 1.5, "stage/rows": 3.0}
    assert logged.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_runs_are_named_after_the_dvc_experiment_or_the_commit() -> None:
    assert run_name({"DVC_EXP_NAME": "rank-8"}, "0a1b2c3d4e5f") == "rank-8"
    assert run_name({}, "0a1b2c3d4e5f") == "repro-0a1b2c3"
    assert len(run_name({"DVC_EXP_NAME": "e" * 300}, "0a1b2c3d4e5f")) == MAX_RUN_NAME  # PostgreSQL's column


def test_storable_writes_nul_out_and_cuts_long_values_keeping_them_apart() -> None:
    assert storable("a\x00b", 10) == "a\\x00b"
    assert storable(["q_proj"], 20) == "['q_proj']"
    one, other = storable("x" * 100, 60), storable("x" * 99 + "y", 60)
    assert len(one) == len(other) == 60 and one != other
    assert one.startswith("xxxx") and one.endswith("...]") and "100 chars, sha256 " in one


def test_a_tracking_server_keeps_its_own_artifact_location_a_local_store_the_repo_root(tmp_path: Path) -> None:
    assert is_tracking_server("http://127.0.0.1:5000") and is_tracking_server("https://mlflow.example.com")
    assert not is_tracking_server("sqlite:////repo/mlflow.db")
    assert not is_tracking_server("postgresql://mlflow@db/mlflow")
    # a local store: the artifacts beside it, where DVC's temporary experiment copies do not take them along
    experiment_id = use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "local", tmp_path / "mlartifacts")
    assert mlflow.get_experiment(experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_the_ui_launcher_gives_the_experiment_the_runs_view_with_lora_and_result_columns(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = use_experiment(uri, "unit", tmp_path / "mlartifacts")
    assert not any(tag.startswith("mlflow.sharedViewState.") for tag in mlflow.get_experiment(experiment_id).tags)
    save_runs_view(experiment_id)
    save_runs_view(experiment_id)  # a second launch finds it and leaves it as it is
    experiment = mlflow.get_experiment_by_name("unit")
    state = json.loads(experiment.tags[f"mlflow.sharedViewState.{RUNS_VIEW}"])
    assert {"params.`lora.r`", "metrics.`evaluate/tuned_loss`"} <= set(state["selectedColumns"])
    assert "groupBy" not in state
    grouped = json.loads(experiment.tags[f"mlflow.sharedViewState.{SWEEPS_VIEW}"])  # the runs of each sweep together
    assert grouped["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "sweep"}]
    assert grouped["selectedColumns"] == state["selectedColumns"]
    assert runs_page("http://h:5000", "1", SWEEPS_VIEW).endswith(
        "/runs?viewStateShareKey=sweeps&workflowType=machine_learning"
    )
    assert runs_page("http://127.0.0.1:5000", experiment.experiment_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={RUNS_VIEW}"
        "&workflowType=machine_learning"
    )


def test_the_experiment_opens_in_the_uis_finetuning_view_unless_a_user_picked_another(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = use_experiment(uri, "unit", tmp_path / "mlartifacts")
    assert mlflow.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    mlflow.MlflowClient().set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    use_experiment(uri, "unit", tmp_path / "mlartifacts")
    assert mlflow.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_guard_gets_a_store_address_that_holds_from_any_folder() -> None:
    """The guard runs in / (a queued experiment's copy may be gone when it marks the run)."""
    assert absolute("sqlite:///mlflow.db", Path("/repo")) == "sqlite:////repo/mlflow.db"
    assert absolute("sqlite:////srv/mlflow.db", Path("/repo")) == "sqlite:////srv/mlflow.db"
    assert absolute("http://mlflow:5000", Path("/repo")) == "http://mlflow:5000"
    assert absolute("databricks", Path("/repo")) == "databricks"


def test_the_runs_guard_marks_it_only_when_the_training_did_not_say_it_ended() -> None:
    assert verdict("0a1b2c\nended\n") == ("0a1b2c", True)  # ended by the training: nothing to do
    assert verdict("0a1b2c\n") == ("0a1b2c", False)  # the pipe closed without it: the training's process died
    assert verdict("") == (None, False)  # died before its run started: no run to mark


def test_evaluate_continues_the_run_that_trained_its_adapter_else_records_a_run_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"the adapter's weights")
    tracking = TrackingConfig(experiment_name="unit")
    with caplog.at_level(logging.WARNING), adapter_run(tracking, adapter, environ) as alone:
        pass  # the store holds no run of this adapter (deleted, say)
    assert alone.info.run_name == "evaluate-only" and "no MLflow run holds this adapter" in caplog.text
    with mlflow.start_run() as trained:  # as train tags the run that saved it
        mlflow.set_tag("adapter_sha256", hashlib.sha256(b"the adapter's weights").hexdigest())
    with adapter_run(tracking, adapter, environ) as continued:
        assert continued.info.run_id == trained.info.run_id
    assert mlflow.get_run(alone.info.run_id).info.status == "FINISHED"
