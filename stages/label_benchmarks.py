"""Label-set benchmarks for evaluate: local JSONL files of `{"text", "label"}` rows, each row's label predicted as
the one the model finds likeliest as the answer (no free-text parsing), scored by accuracy and macro-F1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import scoring
from stages.chat import Chat
from stages.likelihood import nll_per_row


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str  # prefix of its metrics: <name>_base_accuracy, ...
    path: str  # JSONL file, one {"text": ..., "label": ...} per line
    labels: list[str]  # the fixed label set; each answer is scored as one of these
    instruction: str  # put before the text in the user turn


def read_benchmark(bench: BenchmarkConfig) -> list[dict[str, str]]:
    """The rows of a benchmark file, each checked: a JSON object with a text and a label of the fixed set."""
    path = Path(bench.path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.benchmarks {bench.name}: no file {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f'{where}: expected an object with a non-empty "text" string, got {line[:80]!r}')
        if row.get("label") not in bench.labels:
            raise ValueError(f"{where}: label {row.get('label')!r} is not one of {bench.labels}")
        rows.append({"text": row["text"], "label": row["label"]})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def classify(
    model: Any, chat: Chat, bench: BenchmarkConfig, rows: list[dict[str, str]], max_length: int, batch_size: int
) -> list[str]:
    """The label whose rendering as the answer (end-of-turn included) is likeliest after each row's prompt."""
    conversations = []
    for row in rows:
        question = f"{bench.instruction}\n\n{row['text']}" if bench.instruction else row["text"]
        for label in bench.labels:
            conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": label}])
    encoded = chat.encode_many(conversations, max_length)
    nll = [value for value, _ in nll_per_row(model, encoded, chat.tokenizer.pad_token_id, batch_size)]
    k = len(bench.labels)
    return [bench.labels[min(range(k), key=lambda j: nll[i * k + j])] for i in range(len(rows))]


def label_scores(bench: BenchmarkConfig, rows: list[dict[str, str]], predicted: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the predicted labels: `{"accuracy": ..., "macro_f1": ...}`."""
    expected = [row["label"] for row in rows]
    return {
        "accuracy": scoring.accuracy(predicted, expected),
        "macro_f1": scoring.macro_f1(predicted, expected, bench.labels),
    }
