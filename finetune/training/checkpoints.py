"""Training checkpoints that a killed run resumes from, and only the run they belong to.

    models/checkpoints/<fingerprint>/checkpoint-<step>/   the Trainer's checkpoint (adapter, optimizer, RNG, state)
    models/checkpoints/<fingerprint>/checkpoint-<step>/complete.json   written once the save has finished
    models/checkpoints/<fingerprint>/mlflow_run_id        the MLflow run a resumed training continues
    models/checkpoints/<fingerprint>/base_precision.json  the base the checkpoints were trained on, and its precision

The fingerprint hashes every setting that decides the training and the bytes of its data, so a checkpoint of
other parameters or other data lives in another folder and is never picked up. A checkpoint without
`complete.json` (its save was cut short: a kill, a full disk) is deleted, never loaded. The folder is a DVC output with
`persist: true`, so DVC keeps it when the stage reruns after a crash; train deletes it once training finished.
The fingerprint holds `model.load_in_4bit` as written; what `auto` decided is recorded apart, and a resumed training
on a machine where `auto` decides otherwise is refused (`keep_precision`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from finetune.config.params import require
from finetune.model.load import PRECISION_FILE, ModelConfig, record_precision

log = logging.getLogger("train")

COMPLETE = "complete.json"
RUN_ID = "mlflow_run_id"
STEP = re.compile(r"checkpoint-(\d+)")


def fingerprint(settings: dict[str, Any], data_digests: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the settings and the data files' digests (as sorted JSON)."""
    text = json.dumps({"settings": settings, "data": data_digests}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, after deleting any incomplete one; None if there is none."""
    complete = []
    for path in folder.glob("checkpoint-*"):
        match = STEP.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        if (path / COMPLETE).is_file():
            complete.append((int(match[1]), path))
        else:
            log.warning("%s: incomplete (its save was cut short): deleted", path)
            while path.exists():  # every process of a training deletes it at once: what another took first is gone
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(path)
    return max(complete)[1] if complete else None


def checkpoint_step(checkpoint: Path | None) -> int:
    """The step a checkpoint was saved at, 0 for none: `checkpoint_step(Path("out/checkpoint-20"))` -> 20."""
    return 0 if checkpoint is None else int(STEP.fullmatch(checkpoint.name)[1])


def mark_complete(folder: Path, step: int) -> None:
    """Record that `checkpoint-<step>` has been written whole: the Trainer calls back after its save returns."""
    path = folder / f"checkpoint-{step}"
    (path / COMPLETE).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")


def run_id(folder: Path) -> str | None:
    """The MLflow run that an earlier, killed attempt of this training opened, if any."""
    path = folder / RUN_ID
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def keep_precision(folder: Path, model_config: ModelConfig, resume: Path | None) -> None:
    """Record the base the training in `folder` runs on, in the precision decided (`model.load_in_4bit`), as an
    adapter records it (`record_precision`); a training that resumes a checkpoint there must run on the same, or its
    adapter would go on over another base.

    Resuming a folder recorded with `"load_in_4bit": false` on a 4-bit base raises `ValueError: <folder>: its
    checkpoints were trained on a 16-bit base, but model.load_in_4bit chose 4-bit on this machine: ...`."""
    path, load_in_4bit = folder / PRECISION_FILE, model_config.load_in_4bit
    if resume is not None and path.is_file():
        trained = json.loads(path.read_text(encoding="utf-8"))["load_in_4bit"]
        bits = {True: "4-bit", False: "16-bit"}
        require(
            trained == load_in_4bit,
            f"{folder}: its checkpoints were trained on a {bits[trained]} base, but model.load_in_4bit chose "
            f"{bits[load_in_4bit]} on this machine: resume on a GPU like the one that trained them, or delete the "
            "folder to train again",
        )
    folder.mkdir(parents=True, exist_ok=True)
    record_precision(folder, model_config)


def remember_run(folder: Path, run: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ID).write_text(run + "\n", encoding="utf-8")
