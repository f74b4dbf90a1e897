"""Label-set benchmarks for evaluate: the files the benchmarks stage wrote (`{"text", "label", "exact", "ngram"}`
per line, and `benchmarks.json`), each row's label predicted as the one the model finds likeliest as the answer
(no free-text parsing), scored by accuracy and macro-F1 on every row and on the clean rows alone (those found in
the training messages neither whole nor by an n-gram)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.files import BENCHMARK_MANIFEST
from finetune.evaluation import scoring
from finetune.evaluation.likelihood import choice_nll
from finetune.tokens.chat import Chat


@dataclass(frozen=True)
class Benchmark:
    name: str  # prefix of its metrics: <name>_base_accuracy, ...
    labels: list[str]  # the fixed label set; each answer is scored as one of these
    instruction: str  # put before the text in the user turn
    rows: list[dict[str, Any]]  # {"text", "label", "exact", "ngram"}
    provenance: dict[str, Any]  # where the rows came from: Hub id and commit, or local files and their SHA-256


def read_rows(path: Path, labels: list[str]) -> list[dict[str, Any]]:
    """The rows of one benchmark file, each checked: a JSON object with a text, a label of the fixed set and the
    two contamination flags."""
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark file {path}: run the benchmarks stage (dvc repro benchmarks)")
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
        if row.get("label") not in labels:
            raise ValueError(f"{where}: label {row.get('label')!r} is not one of {labels}")
        if not all(isinstance(row.get(flag), bool) for flag in ("exact", "ngram")):
            raise ValueError(f'{where}: expected "exact" and "ngram" flags, true or false')
        rows.append({key: row[key] for key in ("text", "label", "exact", "ngram")})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_benchmarks(folder: Path) -> list[Benchmark]:
    """The benchmarks of the benchmarks stage's folder, in the order of `benchmarks.sets`."""
    manifest = json.loads((folder / BENCHMARK_MANIFEST).read_text(encoding="utf-8"))
    return [
        Benchmark(
            entry["name"],
            entry["labels"],
            entry["instruction"],
            read_rows(folder / f"{entry['name']}.jsonl", entry["labels"]),
            entry["provenance"],
        )
        for entry in manifest["benchmarks"]
    ]


def classify(model: Any, chat: Chat, bench: Benchmark, max_length: int, max_tokens: int) -> list[str]:
    """The label whose rendering as the answer (end-of-turn included) is likeliest after each row's prompt."""
    conversations = []
    for row in bench.rows:
        question = f"{bench.instruction}\n\n{row['text']}" if bench.instruction else row["text"]
        for label in bench.labels:
            conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": label}])
    encoded = chat.encode_many(conversations)
    k = len(bench.labels)
    for number in range(len(bench.rows)):
        longest = max(len(ids) for ids, _ in encoded[number * k : (number + 1) * k])
        if longest > max_length:
            raise ValueError(
                f"{bench.name} row {number + 1}: its prompt and label take {longest} tokens, more than "
                f"model.max_seq_length {max_length}: shorten the text or raise model.max_seq_length"
            )
    nll = choice_nll(model, [encoded[i * k : (i + 1) * k] for i in range(len(bench.rows))], max_tokens)
    return [bench.labels[min(range(k), key=lambda j: scores[j])] for scores in nll]


def label_scores(labels: list[str], expected: list[str], predicted: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the predicted labels: `{"accuracy": ..., "macro_f1": ...}`."""
    return {
        "accuracy": scoring.accuracy(predicted, expected),
        "macro_f1": scoring.macro_f1(predicted, expected, labels),
    }


def benchmark_metrics(bench: Benchmark, predicted: dict[str, list[str]]) -> dict[str, float | int]:
    """A benchmark's numbers: rows, contaminated rows and their share, and for each model (`predicted`, by name)
    accuracy and macro-F1 on every row and on the clean rows alone (left out where every row is contaminated).

    Two rows, the second contaminated, `{"tuned": ["positive", "negative"]}` against labels positive, positive ->
    `{"s_rows": 2, "s_contaminated_rows": 1, "s_contaminated_share": 0.5, "s_clean_rows": 1,
    "s_tuned_accuracy": 0.5, ..., "s_tuned_clean_accuracy": 1.0, ...}`.
    """
    expected = [row["label"] for row in bench.rows]
    clean = [i for i, row in enumerate(bench.rows) if not (row["exact"] or row["ngram"])]
    n = bench.name
    out: dict[str, float | int] = {
        f"{n}_rows": len(expected),
        f"{n}_contaminated_rows": len(expected) - len(clean),
        f"{n}_contaminated_share": (len(expected) - len(clean)) / len(expected),
        f"{n}_clean_rows": len(clean),
    }
    for model, labels in predicted.items():
        out |= {f"{n}_{model}_{k}": v for k, v in label_scores(bench.labels, expected, labels).items()}
        if clean:
            scores = label_scores(bench.labels, [expected[i] for i in clean], [labels[i] for i in clean])
            out |= {f"{n}_{model}_clean_{k}": v for k, v in scores.items()}
    return out
