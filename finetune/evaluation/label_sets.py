"""Label-set benchmarks for evaluate: each row's label predicted as the one the model finds likeliest as the answer
(no free-text parsing), scored by accuracy and macro-F1 on every row and on the clean rows alone (those found in
the training messages neither whole nor by an n-gram)."""

from __future__ import annotations

from typing import Any

from finetune.evaluation import scoring
from finetune.evaluation.benchmark_items import Benchmark, check_fits, clean_rows, contamination_counts, question
from finetune.evaluation.likelihood import Encoded, choice_nll
from finetune.tokens.chat import Chat


def label_choices(chat: Chat, bench: Benchmark, max_length: int) -> list[list[Encoded]]:
    """Each row's choices, encoded: its question with each label as the answer (end-of-turn included). A row whose
    longest choice is over `max_length` tokens stops it: the model would read it cut."""
    labels = bench.labels or []
    conversations = []
    for row in bench.rows:
        asked = question(bench, row["text"])
        for label in labels:
            conversations.append([{"role": "user", "content": asked}, {"role": "assistant", "content": label}])
    encoded = chat.encode_many(conversations)
    k = len(labels)
    rows = [encoded[number * k : (number + 1) * k] for number in range(len(bench.rows))]
    for number, choices in enumerate(rows, start=1):
        check_fits(bench, number, "its prompt and label take", max(len(ids) for ids, _ in choices), max_length)
    return rows


def classify(model: Any, labels: list[str], rows: list[list[Encoded]], max_tokens: int) -> list[str]:
    """The label whose choice (`label_choices`) is likeliest, of each row."""
    nll = choice_nll(model, rows, max_tokens)
    return [labels[min(range(len(labels)), key=lambda j: scores[j])] for scores in nll]


def label_scores(labels: list[str], expected: list[str], predicted: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of the predicted labels: `{"accuracy": ..., "macro_f1": ...}`."""
    return {
        "accuracy": scoring.accuracy(predicted, expected),
        "macro_f1": scoring.macro_f1(predicted, expected, labels),
    }


def label_metrics(bench: Benchmark, predicted: dict[str, list[str]]) -> dict[str, Any]:
    """A label set's numbers: rows, contaminated rows and their share, and for each model (`predicted`, by name)
    accuracy and macro-F1 on every row and on the clean rows alone (left out where every row is contaminated).

    Two rows, the second contaminated, `{"tuned": ["positive", "negative"]}` against labels positive, positive ->
    `{"s_rows": 2, "s_contaminated_rows": 1, "s_contaminated_share": 0.5, "s_clean_rows": 1,
    "s_tuned_accuracy": 0.5, ..., "s_tuned_clean_accuracy": 1.0, ...}`.
    """
    expected, clean, labels = [row["label"] for row in bench.rows], clean_rows(bench), bench.labels or []
    n = bench.name
    out: dict[str, Any] = contamination_counts(bench)
    for model, said in predicted.items():
        out |= {f"{n}_{model}_{k}": v for k, v in label_scores(labels, expected, said).items()}
        if clean:
            scores = label_scores(labels, [expected[i] for i in clean], [said[i] for i in clean])
            out |= {f"{n}_{model}_clean_{k}": v for k, v in scores.items()}
    return out
