"""Where the MLflow store is, and opening it: the one place train, evaluate and the tools point MLflow at it.

The store defaults to `sqlite:///<repo root>/mlflow.db`; the repo root is DVC's `DVC_ROOT`, which points at the
real repo also when an experiment runs in a temporary copy (`dvc exp run --temp`). A team's tracking server
(`MLFLOW_TRACKING_URI=http://...`, with MLFLOW_TRACKING_USERNAME/PASSWORD) keeps the artifacts where it was told
to (`tools/servers/`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from finetune.config.params import require
from finetune.training.leases import held


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = "finance-deepseek"  # MLflow experiment that holds every training run
    registered_model: str | None = None  # registered model that each trained adapter becomes a version of
    system_metrics_seconds: float = 10.0  # seconds between samples of GPU/CPU/memory use during training

    def __post_init__(self) -> None:
        require(bool(self.experiment_name.strip()), "tracking.experiment_name must not be empty")
        require(
            self.system_metrics_seconds > 0,
            f"tracking.system_metrics_seconds must be > 0, got {self.system_metrics_seconds}",
        )
        require(
            self.registered_model is None or bool(self.registered_model.strip()),
            "tracking.registered_model must be a name or null",
        )
        name = self.registered_model or "model"
        require(  # MLflow refuses '/' and ':' and path-like names; a quote or backslash would break the version search
            not any(c in name for c in "/:'\"\\") and name.strip() not in (".", ".."),
            "tracking.registered_model must hold no '/', ':', quote or backslash and not be '.' or '..' (MLflow's "
            f"model names), got {self.registered_model!r}",
        )


def store_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """The folder that holds `mlflow.db` and `mlartifacts/`: DVC's repo root when DVC runs us, else `cwd`."""
    return Path(environ.get("DVC_ROOT") or cwd).resolve()


def tracking_uri(environ: Mapping[str, str], root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store at the repo root.

    `tracking_uri({}, Path("/repo"))` -> `'sqlite:////repo/mlflow.db'`.
    """
    return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def is_tracking_server(uri: str) -> bool:
    """Whether `uri` is a tracking server, which keeps artifacts where it was told to (`--artifacts-destination`).

    `is_tracking_server("http://127.0.0.1:5000")` -> True; `is_tracking_server("sqlite:////repo/mlflow.db")` -> False.
    """
    return uri.lower().startswith(("http://", "https://"))


# What kind of experiment this is, for MLflow 3's UI: without the tag it is taken for a GenAI app's (traces,
# sessions); "finetuning" is one of the UI's machine-learning kinds (`ExperimentKind` in mlflow/server/js), whose
# view is "Model training" (the runs table, model metrics).
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")


def use_experiment(uri: str, name: str, artifact_root: Path) -> str:
    """Point MLflow at `uri` and the experiment `name`, creating it with artifacts under `artifact_root`.

    The artifact location is explicit so that artifacts of runs made in DVC's temporary experiment copies land
    beside the store rather than in a folder that DVC deletes afterwards; a tracking server chooses its own. The
    experiment is of the kind `EXPERIMENT_KIND` unless someone picked another in the UI. Returns its id.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(
                name, artifact_location=None if is_tracking_server(uri) else artifact_root.as_uri()
            )
        except mlflow.exceptions.MlflowException:  # another clone created it a moment ago: that one is ours
            if mlflow.get_experiment_by_name(name) is None:
                raise
        experiment = mlflow.get_experiment_by_name(name)
    if EXPERIMENT_KIND[0] not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(name)
    return experiment.experiment_id


def store_lock(uri: str) -> Path | None:
    """The file locked while a SQLite store is opened, beside its database; None for any other store.

    `store_lock("sqlite:////repo/mlflow.db")` -> `Path('/repo/mlflow.db.lock')`; `store_lock("http://h:5000")` -> None.
    """
    return Path(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else None


def open_store(config: TrackingConfig, environ: Mapping[str, str], cwd: Path) -> str:
    """Point MLflow at this project's store (`tracking_uri`) and its experiment; the experiment's id.

    A SQLite store is opened by one process at a time: the first opening creates its tables, and several that
    create them at once (the first experiments of a sweep) fail on each other's. Once it exists, SQLite's own locks
    and MLflow's busy timeout (20 s) let the experiments' runs write side by side. Its journal stays SQLite's
    default rather than WAL, which needs memory shared between the writers: not so on NFS, where several machines
    training together write into one store."""
    root = store_root(environ, cwd)
    uri = tracking_uri(environ, root)
    lock = store_lock(uri)
    with held(lock) if lock else contextlib.nullcontext():
        return use_experiment(uri, config.experiment_name, root / "mlartifacts")
