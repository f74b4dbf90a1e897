"""What train reads and writes besides the model: the tokenize stage's files, checked against this model's
tokenizer, and the loss curves of the Trainer's log."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from finetune.config.params import require, scored_rows
from finetune.tokens.chat import PROBE, PROBE_FILE, Chat

LOSS_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "padding_share")
EVAL_LOSS_COLUMNS = ("step", "eval_loss")


def read_tokenized(data: Path, eval_rows: int) -> tuple[Any, Any]:
    """The training conversations and the first `eval_rows` held-out ones (all of them, said, where there are fewer),
    as the tokenize stage wrote them: memory-mapped Arrow files, read without a copy (by every rank alike)."""
    from datasets import Dataset

    columns = ["input_ids", "labels"]
    train_set = Dataset.from_file(str(data / "train.arrow")).select_columns(columns)
    held_out = Dataset.from_file(str(data / "eval.arrow")).select_columns(columns)
    return train_set, held_out.select(range(scored_rows("train.eval_rows", len(held_out), eval_rows)))


def check_encoding(chat: Chat, data: Path) -> None:
    """Fail unless this model's tokenizer and chat settings encode as the tokenize stage did: the token ids were
    made with `AutoTokenizer`, the model's tokenizer comes from unsloth's loader."""
    expected = json.loads((data / PROBE_FILE).read_text(encoding="utf-8"))["input_ids"]
    found = chat.encode(PROBE)[0]
    require(
        found == expected,
        f"{data} was encoded by another tokenizer or chat template than this model's: the probe conversation is "
        f"{expected[:12]}... there and {found[:12]}... here; rerun the tokenize stage (dvc repro)",
    )


def loss_rows(log_history: list[dict[str, float]], columns: tuple[str, ...] = LOSS_COLUMNS) -> list[dict[str, float]]:
    """The records of a Trainer's `log_history` that hold `columns[1]`, for the loss plots.

    `[{"loss": 2.0, "step": 1, "learning_rate": 1e-4, "grad_norm": 0.5}, {"train_runtime": 3.0, "step": 1}]`
    -> `[{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5}]`
    """
    return [{key: entry.get(key) for key in columns} for entry in log_history if columns[1] in entry]


def logged_mean(rows: list[dict[str, float]], key: str) -> float:
    """Mean of `key` over the logged steps that hold it: `logged_mean([{"loss": 1.0}, {"loss": 3.0}], "loss")` = 2."""
    return mean(row[key] for row in rows if row.get(key) is not None)


def attempt_speed(metrics: dict[str, float], steps_run: int, max_steps: int) -> dict[str, float]:
    """`train_runtime` and `train_samples_per_second` of this attempt at the training, from the Trainer's result:
    it times this process's steps alone, but counts the samples of all `max_steps`, so a resumed training (or one
    stopped early) would claim the samples of steps it did not run.

    `attempt_speed({"train_runtime": 10.0, "train_samples_per_second": 6.0}, 10, 30)` ->
    `{"train_runtime": 10.0, "train_samples_per_second": 2.0}`
    """
    rate = metrics["train_samples_per_second"] * steps_run / max_steps
    return {"train_runtime": metrics["train_runtime"], "train_samples_per_second": rate}
