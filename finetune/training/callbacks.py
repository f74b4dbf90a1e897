"""The Trainer's callbacks: a checkpoint marked complete once written, and a diverged training stopped."""

from __future__ import annotations

import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.training import checkpoints
from finetune.training.adapter import non_finite, trainable_weights
from finetune.training.config import TrainConfig
from finetune.training.failures import diverged


class MarkCheckpointsComplete(TrainerCallback):
    """Marks each checkpoint in `folder` complete once the Trainer's save has returned (`checkpoints.latest` takes
    only complete ones)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoints.mark_complete(self.folder, state.global_step)


class StopOnDivergence(TrainerCallback):
    """A non-finite loss or gradient norm ends the training (every process sees the same gathered values), and no
    checkpoint is written from non-finite adapter weights: the complete ones before stay, to resume from."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.broken = False  # the adapter's weights went non-finite: no checkpoint of them, the log says why

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
        if bad or self.broken:
            what = [f"{k} {v}" for k, v in bad.items()] + (["adapter weights not finite"] if self.broken else [])
            raise diverged(state.global_step, ", ".join(what), self.config)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if control.should_save and non_finite(trainable_weights(model)):
            control.should_save, self.broken = False, True
            if not control.should_log:
                raise diverged(state.global_step, "adapter weights not finite", self.config)
