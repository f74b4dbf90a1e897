"""What goes into an MLflow run: settings and tags, the data it read, the numbers a stage measured.

Every number train or evaluate measures goes through `report`, so `metrics/<stage>.json`, `dvc metrics show` and
the MLflow run agree. A team's tracking server may keep its runs in a database that refuses what SQLite stores, so
parameter values, tags and run names pass through `storable` first.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path

from finetune.data.files import write_json

log = logging.getLogger(__name__)


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


def git_commit(cwd: Path) -> str:
    """The commit the code ran from, or `unknown` outside a git checkout."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


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
