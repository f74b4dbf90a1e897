"""MLflow helpers shared by the train and evaluate stages (and the MLflow UI launcher, `tools/mlflow_ui.py`).

Every number train or evaluate measures goes through `report`, so `metrics/<stage>.json`, `dvc metrics show` and
the MLflow run agree. The store defaults to `sqlite:///<repo root>/mlflow.db`; the repo root is DVC's `DVC_ROOT`,
which points at the real repo also when an experiment runs in a temporary copy (`dvc exp run --temp`). A team's
tracking server (`MLFLOW_TRACKING_URI=http://...`, with MLFLOW_TRACKING_USERNAME/PASSWORD) keeps the artifacts
where it was told to (`tools/servers.py`); its database may refuse what SQLite stores, so parameter values, tags
and run names pass through `storable` first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stages.files import file_hash, write_json
from stages.params import require

log = logging.getLogger(__name__)


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


def lock_hashes(lock: Path) -> dict[str, str]:
    """`{path: md5}` of every stage output that `dvc.lock` records; empty when there is no lock yet."""
    import yaml

    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", []) if "md5" in out}


def log_data_inputs(files: dict[str, Path], digests: dict[str, str]) -> None:
    """Log each data file as an MLflow dataset input of the active run, its DVC hash (MD5) as the digest.

    `files` maps the context (`training`, `evaluation`) to the file.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for context, path in files.items():
        source = resolve_dataset_source(str(path.resolve()))
        name = f"{path.parent.name}/{path.name}"
        mlflow.log_input(MetaDataset(source=source, name=name, digest=digests[context]), context=context)


def register_adapter(name: str, run_id: str, artifact_uri: str) -> str:
    """Register the run's `adapter` artifacts as a new version of the registered model `name`; its version."""
    import mlflow

    client = mlflow.MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="LoRA adapters trained by this project's train stage")
    version = client.create_model_version(name, source=f"{artifact_uri}/adapter", run_id=run_id)
    return str(version.version)


# MLflow cuts a longer parameter value silently (`mlflow.utils.validation.MAX_PARAM_VAL_LENGTH`)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000  # ... and a longer tag value (MAX_TAG_VAL_LENGTH)
# the `runs.name` column: SQLite stores a longer name, PostgreSQL refuses the whole run
MAX_RUN_NAME = 250


def storable(value: object, limit: int) -> str:
    """`value` as text that every MLflow store keeps as it is: NUL characters, which SQLite stores and PostgreSQL
    refuses, written `\\x00`; a text longer than `limit` cut, ending in its length and SHA-256 so that two long
    values that differ still differ.

    `storable("a\\x00b", 10)` -> `'a\\\\x00b'`; `storable("x" * 100, 60)` ->
    `'xxxxxxxxxxxxxxxxxxx… [100 chars, sha256 09ecb6ebc8bcefc7...]'` (60 characters)
    """
    text = str(value).replace("\x00", "\\x00")
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    tail = f"… [{len(text)} chars, sha256 {digest}...]"
    return text[: limit - len(tail)] + tail


def log_settings(settings: Mapping[str, object], tags: Mapping[str, object]) -> None:
    """Log `settings` as the active run's parameters and `tags` as its tags, each value `storable`."""
    import mlflow

    mlflow.set_tags({key: storable(value, MAX_TAG_VALUE) for key, value in tags.items()})
    mlflow.log_params({key: storable(value, MAX_PARAM_VALUE) for key, value in settings.items()})


def store_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """The folder that holds `mlflow.db` and `mlartifacts/`: DVC's repo root when DVC runs us, else `cwd`."""
    return Path(environ.get("DVC_ROOT") or cwd).resolve()


def tracking_uri(environ: Mapping[str, str], root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store at the repo root.

    `tracking_uri({}, Path("/repo"))` -> `'sqlite:////repo/mlflow.db'`.
    """
    return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def served(uri: str) -> bool:
    """Whether `uri` is a tracking server, which keeps artifacts where it was told to (`--artifacts-destination`).

    `served("http://127.0.0.1:5000")` -> True; `served("sqlite:////repo/mlflow.db")` -> False.
    """
    return uri.startswith(("http://", "https://"))


def git_commit(cwd: Path) -> str:
    """The commit the code ran from, or `unknown` outside a git checkout."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


# The runs-table view that the MLflow UI opens with `?viewStateShareKey=<RUNS_VIEW>`: one column per LoRA setting
# and key result, so runs tell themselves apart without picking columns (the UI keeps a user's own picks in the
# browser only). Stored as an experiment tag, where the UI's own "share view" stores it.
RUNS_VIEW = "lora-and-results"
RUNS_VIEW_COLUMNS = (
    "params.`lora.r`",
    "params.`lora.lora_alpha`",
    "params.`lora.target_modules`",
    "params.`train.learning_rate`",
    "params.`train.max_steps`",
    "metrics.`train/train_loss`",
    "metrics.`evaluate/base_loss`",
    "metrics.`evaluate/tuned_loss`",
    "metrics.`evaluate/loss_change_pct`",
    "metrics.`evaluate/tuned_rouge_l`",
)


def runs_view_state() -> str:
    """The shared view's state, as the UI reads it from the tag `mlflow.sharedViewState.<RUNS_VIEW>`."""
    return json.dumps(
        {
            "searchFilter": "",
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "startTime": "ALL",
            "lifecycleFilter": "Active",
            "datasetsFilter": [],
            "modelVersionFilter": "All Runs",
            "selectedColumns": list(RUNS_VIEW_COLUMNS),
        }
    )


# What kind of experiment this is, for MLflow 3's UI: without the tag it is taken for a GenAI app's (traces,
# sessions); "finetuning" is one of the UI's machine-learning kinds (`ExperimentKind` in mlflow/server/js), whose
# view is "Model training" (the runs table, model metrics). MLflow 3.17's UI shows the view its GenAI / Model training
# switch (or the address's `workflowType`) asks for, hence `WORKFLOW` in the address `runs_page` prints.
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")
WORKFLOW = "machine_learning"  # the UI's workflow of the finetuning kind: its "Model training" view


def use_experiment(uri: str, name: str, artifact_root: Path) -> str:
    """Point MLflow at `uri` and the experiment `name`, creating it with artifacts under `artifact_root`.

    The artifact location is explicit so that artifacts of runs made in DVC's temporary experiment copies land
    beside the store rather than in a folder that DVC deletes afterwards; a tracking server (`served`) chooses
    its own. The experiment carries the runs-table view `RUNS_VIEW` and, unless someone picked another kind in
    the UI, the kind `EXPERIMENT_KIND`. Returns the experiment's id.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=None if served(uri) else artifact_root.as_uri())
        except mlflow.exceptions.MlflowException:  # another clone created it a moment ago: that one is ours
            if mlflow.get_experiment_by_name(name) is None:
                raise
    experiment_id = (experiment or mlflow.get_experiment_by_name(name)).experiment_id
    tag, state = f"mlflow.sharedViewState.{RUNS_VIEW}", runs_view_state()
    tags = experiment.tags if experiment is not None else {}
    if tags.get(tag) != state:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, tag, state)
    if EXPERIMENT_KIND[0] not in tags:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(name)
    return experiment_id


def runs_page(base_url: str, experiment_id: str) -> str:
    """The UI address of an experiment's runs table, in the Model training view, with the LoRA settings and key
    results as columns.

    `runs_page("http://127.0.0.1:5000", "1")`
    -> `'http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=lora-and-results&workflowType=machine_learning'`
    """
    return f"{base_url}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}&workflowType={WORKFLOW}"


def run_name(environ: Mapping[str, str], commit: str) -> str:
    """The MLflow run's name: the DVC experiment's (`storable`), or for a plain `dvc repro` `repro-<commit>`.

    `run_name({"DVC_EXP_NAME": "rank-8"}, "0a1b2c3d4e")` -> `'rank-8'`;
    `run_name({}, "0a1b2c3d4e")` -> `'repro-0a1b2c3'`.
    """
    return storable(environ.get("DVC_EXP_NAME") or f"repro-{commit[:7]}", MAX_RUN_NAME)


def report(metrics: Mapping[str, float | int], path: Path, prefix: str) -> None:
    """Write `metrics` to `path` and log them to the active MLflow run as `<prefix>/<name>`."""
    import mlflow

    write_json(path, metrics)
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"{prefix}/{key}": float(value) for key, value in metrics.items()})
    log.info("metrics -> %s: %s", path, dict(metrics))


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
