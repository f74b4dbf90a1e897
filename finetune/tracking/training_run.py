"""The MLflow run of a training: opened (or continued, after a kill) as it starts, given the adapter as it ends
(tagged with its SHA-256, by which evaluate finds the run again: `finetune.tracking.adapter_run`).

One run per training: a resumed training continues the run its killed attempt opened (the checkpoint folder
remembers its id); a training that raises ends its run FAILED; one killed is marked KILLED by the run's guard
(`finetune.tracking.guard`), or, where the guard too was gone, by the next attempt with nothing to resume. On
several machines each machine's first process logs that machine's system metrics into it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from finetune.tracking.adapter_run import adapter_digest
from finetune.tracking.guard import guarded
from finetune.tracking.records import git_commit, lock_hashes, log_data_inputs, log_settings, run_name
from finetune.tracking.store import TrackingConfig, open_store, store_root, tracking_uri
from finetune.training import checkpoints
from finetune.training.distributed import World

log = logging.getLogger(__name__)

DATA_TAGS = ("data/raw", "data/sharegpt", "data/standardized", "data/tokenized")  # dvc.lock hashes tagged on the run


def stored_run(run_id: str) -> Any:
    """The MLflow run of that id, or None if the store does not hold it (or holds it deleted)."""
    import mlflow

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


@contextlib.contextmanager
def training_run(
    tracking: TrackingConfig,
    folder: Path,
    resume: Path | None,
    settings: dict[str, Any],
    files: dict[str, Path],
    digests: dict[str, str],
    environ: Mapping[str, str],
) -> Iterator[Any]:
    """The MLflow run of this training, in the store at the repo root, continued from a killed attempt when it
    resumes one (`folder` is its checkpoint folder). It carries the settings, the data (dataset inputs with DVC's
    hashes, the `dvc.lock` tags) and the commit, and ends FAILED if the training raises."""
    import mlflow

    experiment = open_store(tracking, environ, Path.cwd())
    commit = git_commit(Path.cwd())
    remembered = checkpoints.run_id(folder)
    earlier = stored_run(remembered) if remembered is not None else None
    continues = {}
    if earlier is not None and (resume is None or earlier.info.experiment_id != experiment):
        # not continued: nothing of it is reused, or tracking.experiment_name changed since the kill (then a new run
        # in that experiment records this training from the checkpoint on, tagged with the run it continues)
        if earlier.info.status == "RUNNING":  # killed (a failed run was marked FAILED as it failed)
            mlflow.MlflowClient().set_terminated(remembered, "KILLED")
        if resume is not None:
            log.warning(
                "the killed attempt's run %s is in another experiment than tracking.experiment_name %r: a new run "
                "records this training from %s on (tag continues_run)",
                *(remembered, tracking.experiment_name, resume.name),
            )
            continues = {"continues_run": remembered}
        earlier = None
    name = None if earlier else run_name(environ, commit)
    mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_seconds)
    # the guard outlives the run's block: it marks the run KILLED if this process dies before the run has ended
    with (
        guarded(mlflow.get_tracking_uri()) as guard,
        mlflow.start_run(run_id=earlier and earlier.info.run_id, run_name=name, log_system_metrics=True) as run,
    ):
        guard(run.info.run_id)
        checkpoints.remember_run(folder, run.info.run_id)
        locked = {f"dvc_lock.{path}": md5 for path, md5 in lock_hashes(Path("dvc.lock")).items() if path in DATA_TAGS}
        tags = {"git_commit": commit, "dvc_exp_name": environ.get("DVC_EXP_NAME", ""), "stage": "train"}
        if environ.get("DVC_EXP_BASELINE_REV"):  # the experiments of one commit, a sweep's: grouped in the UI
            tags["sweep"] = environ["DVC_EXP_BASELINE_REV"][:7]
        log_settings(settings, tags | locked | continues | ({"resumed_from": resume.name} if resume else {}))
        if earlier is None:  # a new run: a continued one has them from its first attempt
            log_data_inputs(files, digests)
        yield run


@contextlib.contextmanager
def machine_metrics(run: Any, world: World, tracking: TrackingConfig, environ: Mapping[str, str]) -> Iterator[None]:
    """On several machines, the first process of each machine but rank 0's logs that machine's GPU, CPU and memory
    use into the training's run, as `system/node<N>/...` (rank 0's run logs its own machine's as `system/...`).
    Every process must enter: rank 0 sends the run's id to the others (the Trainer has joined them by now)."""
    if world.size == 1:
        yield
        return
    import mlflow
    import torch.distributed
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    shared = [run.info.run_id if world.main else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    node = int(environ.get("GROUP_RANK", "0"))  # torchrun's number of this machine
    if world.local_rank != 0 or node == 0:
        yield
        return
    mlflow.set_tracking_uri(tracking_uri(environ, store_root(environ, Path.cwd())))
    monitor = SystemMetricsMonitor(
        shared[0], sampling_interval=tracking.system_metrics_seconds, resume_logging=True, node_id=f"node{node}"
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # what was sampled since the monitor last logged, which it leaves unlogged when it stops: all of a short
        # training's samples, where the machine was too busy to log within the training
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()


def register_adapter(name: str, run_id: str, artifact_uri: str) -> str:
    """Register the run's `adapter` artifacts as a new version of the registered model `name`; its version. A run
    registers one version: a training killed after registering, before its checkpoints were deleted, resumes into
    its finished run and finds its version there (as its checkpoint's adapter, the same)."""
    import mlflow

    client = mlflow.MlflowClient()
    earlier = client.search_model_versions(filter_string=f"name = '{name}' and run_id = '{run_id}'")
    if earlier:
        return str(earlier[0].version)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        try:
            client.create_registered_model(name, description="LoRA adapters trained by this project's train stage")
        except mlflow.exceptions.MlflowException as error:  # another training registered it a moment ago
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    version = client.create_model_version(name, source=f"{artifact_uri}/adapter", run_id=run_id)
    return str(version.version)


def record_adapter(run: Any, adapter: Path, registered_model: str | None) -> None:
    """The adapter as the run's artifacts, tagged with its SHA-256 (evaluate finds the run by it), and registered
    as a new version of `registered_model` unless that is null."""
    import mlflow

    mlflow.log_artifacts(str(adapter), artifact_path="adapter")
    mlflow.set_tag("adapter_sha256", adapter_digest(adapter))
    if registered_model:
        version = register_adapter(registered_model, run.info.run_id, run.info.artifact_uri)
        log.info("adapter registered as %s version %s", registered_model, version)
