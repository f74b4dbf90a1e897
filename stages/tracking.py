"""MLflow and metrics-file helpers shared by the train and evaluate stages.

Every number a stage measures goes through `report`, so `metrics/<stage>.json`, `dvc metrics show` and the
MLflow run agree. The store defaults to `sqlite:///<repo root>/mlflow.db`; the repo root is DVC's `DVC_ROOT`,
which points at the real repo also when an experiment runs in a temporary copy (`dvc exp run --temp`).
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.params import require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = "finance-deepseek"  # MLflow experiment that holds every training run

    def __post_init__(self) -> None:
        require(bool(self.experiment_name.strip()), "tracking.experiment_name must not be empty")


def store_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """The folder that holds `mlflow.db` and `mlartifacts/`: DVC's repo root when DVC runs us, else `cwd`."""
    return Path(environ.get("DVC_ROOT") or cwd).resolve()


def tracking_uri(environ: Mapping[str, str], root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store at the repo root.

    `tracking_uri({}, Path("/repo"))` -> `'sqlite:////repo/mlflow.db'`.
    """
    return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def git_commit(cwd: Path) -> str:
    """The commit the code ran from, or `unknown` outside a git checkout."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def use_experiment(uri: str, name: str, artifact_root: Path) -> None:
    """Point MLflow at `uri` and the experiment `name`, creating it with artifacts under `artifact_root`.

    The artifact location is explicit so that artifacts of runs made in DVC's temporary experiment copies land
    beside the store rather than in a folder that DVC deletes afterwards.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_root.as_uri())
    mlflow.set_experiment(name)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON so the file diffs cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Rows as a CSV file with a header, as `dvc plots` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def report(metrics: Mapping[str, float | int], path: Path, prefix: str) -> None:
    """Write `metrics` to `path` and log them to the active MLflow run as `<prefix>/<name>`."""
    import mlflow

    write_json(path, metrics)
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"{prefix}/{key}": float(value) for key, value in metrics.items()})
    log.info("metrics -> %s: %s", path, dict(metrics))


def adapter_digest(adapter: Path) -> str:
    """SHA-256 of the adapter's weights: evaluate finds the training run that made the adapter it scores by it."""
    import hashlib

    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
