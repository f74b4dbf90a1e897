"""What a failed training leaves: a full disk named with the folders and the space left, no checkpoint folder
unless it can be resumed from, and a diverged training's error saying what to change."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.training import checkpoints

if TYPE_CHECKING:
    from finetune.training.config import TrainConfig


def disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or one it arose from, says a disk is full: Python's `OSError` ENOSPC, or the message of the
    Rust writers of tokenizers and safetensors (`Exception: No space left on device (os error 28)`)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(words in str(error) for words in ("No space left on device", "os error 28", "StorageFull")):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def full_disk_named(*folders: Path) -> Iterator[None]:
    """An error of a full disk while training or saving becomes one that names the folders written to and the space
    left on their disks (the libraries' own messages name neither)."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        free = ", ".join(
            f"{folder}: {shutil.disk_usage(existing_parent(folder)).free:,} bytes free" for folder in folders
        )
        raise OSError(
            errno.ENOSPC,
            f"a disk is full: the training could not write its checkpoint or adapter ({free}). Free some space "
            "(or move models/ to a larger disk), then dvc repro: it resumes from the last complete checkpoint",
        ) from error


def existing_parent(path: Path) -> Path:
    """`path`, or its closest folder that exists."""
    return next(folder for folder in (path, *path.parents) if folder.exists())


@contextlib.contextmanager
def removed_unless_resumable(folder: Path) -> Iterator[None]:
    """A training that fails removes its checkpoint folder unless it holds a complete checkpoint to resume from (a
    diverged run keeps the ones before it diverged). A killed process removes nothing: the folder tells the next
    attempt which MLflow run was left RUNNING (`finetune.tracking.training_run` marks it KILLED)."""
    try:
        yield
    except BaseException:
        if checkpoints.latest(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def diverged(step: int, what: str, config: TrainConfig) -> FloatingPointError:
    """The error that ends a diverged training, saying what to change."""
    return FloatingPointError(
        f"training diverged at step {step}: {what}. No adapter is written from these weights; the complete "
        f"checkpoints before this step are kept. Lower train.learning_rate ({config.learning_rate}) or raise "
        "train.warmup_steps, then dvc repro"
    )
