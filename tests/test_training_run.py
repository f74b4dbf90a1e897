"""The train stage's MLflow run without a training: one run per training, continued by the attempt that resumes a
killed one, a new one where the killed attempt's run cannot be continued."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from finetune.tracking.guard import guarded
from finetune.tracking.store import TrackingConfig
from finetune.tracking.training_run import record_adapter, training_run
from finetune.training import checkpoints

pytestmark = pytest.mark.slow  # the run's guard is a process of its own: not in make test-fast

SETTINGS = {"lora.r": 4, "train.max_steps": 60}


@pytest.fixture
def data(tmp_path: Path) -> tuple[dict[str, Path], dict[str, str]]:
    train = tmp_path / "data" / "train.arrow"
    train.parent.mkdir()
    train.write_bytes(b"rows")
    return {"training": train}, {"training": "0" * 32}


@pytest.fixture
def folder(mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The training's checkpoint folder, in a project folder of its own with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "checkpoints" / "abc"


def killed_attempt(folder: Path, experiment: str) -> str:
    """A run left RUNNING in `experiment`, as a killed training leaves it, remembered in its checkpoint folder."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment))
    checkpoints.remember_run(folder, run.info.run_id)
    return run.info.run_id


def trained(folder: Path, experiment: str, resume: Path | None, data: tuple) -> str:
    with training_run(TrackingConfig(experiment_name=experiment), folder, resume, SETTINGS, *data, {}) as run:
        mlflow.log_metric("loss", 1.0, step=30)
    return run.info.run_id


def test_a_resumed_training_continues_its_killed_attempts_run(folder: Path, data: tuple) -> None:
    first = killed_attempt(folder, "finance")
    assert trained(folder, "finance", folder / "checkpoint-20", data) == first
    run = mlflow.MlflowClient().get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == "checkpoint-20"
    assert "continues_run" not in run.data.tags and run.inputs.dataset_inputs == []  # its first attempt logs them


def test_a_training_that_starts_afresh_ends_the_killed_attempts_run_killed(folder: Path, data: tuple) -> None:
    first = killed_attempt(folder, "finance")
    second = trained(folder, "finance", None, data)
    client = mlflow.MlflowClient()
    assert second != first and client.get_run(first).info.status == "KILLED"
    assert [i.dataset.digest for i in client.get_run(second).inputs.dataset_inputs] == ["0" * 32]


def test_a_resume_after_the_experiment_was_renamed_records_the_rest_in_a_new_run_there(
    folder: Path, data: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow cannot continue a run in another experiment than the active one: every resume used to fail so."""
    first = killed_attempt(folder, "finance")
    second = trained(folder, "finance-v2", folder / "checkpoint-20", data)
    client = mlflow.MlflowClient()
    assert second != first and client.get_run(first).info.status == "KILLED"
    run = client.get_run(second)
    assert client.get_experiment(run.info.experiment_id).name == "finance-v2" and run.info.status == "FINISHED"
    assert run.data.tags["continues_run"] == first and run.data.tags["resumed_from"] == "checkpoint-20"
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == ["0" * 32]
    assert checkpoints.run_id(folder) == second  # a further kill and resume continues the new run
    assert f"the killed attempt's run {first} is in another experiment than tracking.experiment_name" in caplog.text


def test_a_remembered_run_deleted_from_the_store_is_not_continued(folder: Path, data: tuple) -> None:
    first = killed_attempt(folder, "finance")
    mlflow.MlflowClient().delete_run(first)
    second = trained(folder, "finance", folder / "checkpoint-20", data)
    run = mlflow.MlflowClient().get_run(second)
    assert second != first and run.data.tags["resumed_from"] == "checkpoint-20"
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == ["0" * 32]  # a new run carries its data


def test_the_guard_marks_a_killed_training_even_where_its_folder_is_gone(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued experiment's copy, where its training ran, is deleted by DVC once the training is killed: the guard
    then failed to open the store (FileNotFoundError from the deleted working folder) and the run stayed RUNNING."""
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with contextlib.suppress(KeyboardInterrupt), guarded(mlflow_store) as tell:
        run = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("queued"))
        tell(run.info.run_id)
        monkeypatch.chdir(tmp_path)
        shutil.rmtree(copy)
        raise KeyboardInterrupt  # the training dies without ending its run
    deadline = time.monotonic() + 120
    while mlflow.MlflowClient().get_run(run.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """An adapter folder as the train stage saves one, its weights a few bytes."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_a_run_registers_its_adapter_once(folder: Path, data: tuple, adapter: Path) -> None:
    """A training killed between registering its adapter and deleting its checkpoints resumes into its finished
    run: it registered a second version of the same adapter before."""
    with training_run(TrackingConfig(experiment_name="finance"), folder, None, SETTINGS, *data, {}) as run:
        record_adapter(run, adapter, "finance-adapter")
    other = killed_attempt(folder.parent / "other", "finance")
    with mlflow.start_run(run_id=other) as second:
        record_adapter(second, adapter, "finance-adapter")
    resume = folder / "checkpoint-60"
    with training_run(TrackingConfig(experiment_name="finance"), folder, resume, SETTINGS, *data, {}) as resumed:
        record_adapter(resumed, adapter, "finance-adapter")  # the resumed attempt, in its finished run
    versions = mlflow.MlflowClient().search_model_versions("name = 'finance-adapter'")
    assert sorted((v.run_id, int(v.version)) for v in versions) == sorted([(run.info.run_id, 1), (other, 2)])


def test_an_adapter_is_logged_but_not_registered_with_no_registered_model(
    folder: Path, data: tuple, adapter: Path
) -> None:
    with training_run(TrackingConfig(experiment_name="finance"), folder, None, SETTINGS, *data, {}) as run:
        record_adapter(run, adapter, None)
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_model.safetensors"]
    assert "adapter_sha256" in client.get_run(run.info.run_id).data.tags and not client.search_model_versions()
