"""The MLflow run that trained an adapter, found by the SHA-256 of its weights: where evaluate records its numbers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from finetune.data.files import file_hash
from finetune.tracking.store import TrackingConfig, open_store

log = logging.getLogger(__name__)


def adapter_digest(adapter: Path) -> str:
    """SHA-256 of the adapter's weights: evaluate finds the training run that made the adapter it scores by it."""
    return file_hash(adapter / "adapter_model.safetensors", "sha256")


def find_training_run(experiment_name: str, digest: str) -> str | None:
    """The newest MLflow run of the experiment whose adapter has this SHA-256 (`adapter_digest`), or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment_name],
        filter_string=f"tags.adapter_sha256 = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def adapter_run(tracking: TrackingConfig, adapter: Path, environ: Mapping[str, str]) -> Iterator[Any]:
    """The MLflow run that trained `adapter`, continued; a new run `evaluate-only` where the store holds none
    (deleted, say), with a warning."""
    import mlflow

    open_store(tracking, environ, Path.cwd())
    run_id = find_training_run(tracking.experiment_name, adapter_digest(adapter))
    if run_id is None:
        log.warning("no MLflow run holds this adapter (store deleted?): recording evaluation in a new run")
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate-only") as run:
        yield run
