"""Numeric benchmarks for evaluate: each question asked through the chat template's generation prompt, the model
reasoning freely up to the benchmark's `max_new_tokens` (greedy, batched: `answers.generate`); the final answer,
the text after the reasoning block, read as a number (`numbers.extract`) and scored against the reference within
the benchmark's relative tolerance (`numbers.correct`). Reported per model: accuracy, the share of answers with no
value to read (extraction failures, reasoning cut short included), the mean reasoning and final-answer lengths in
tokens and the mean tokens generated (what the answers cost); on every item and on the clean items alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.evaluation.answers import Answer
from finetune.evaluation.benchmark_items import Benchmark, check_fits, clean_rows, contamination_counts, question
from finetune.evaluation.numbers import Value, correct, extract
from finetune.tokens.chat import Chat, token_ids


def numeric_prompts(chat: Chat, bench: Benchmark, max_length: int) -> list[list[int]]:
    """Each item's prompt as token ids: its question as the user turn, then the generation prompt (which opens
    the reasoning block where `chat.think` is empty_block). A prompt over `max_length` tokens stops it: the model
    would read it cut."""
    out = []
    for number, row in enumerate(bench.rows, start=1):
        ids = chat.prompt_ids([{"role": "user", "content": question(bench, row["text"])}])
        check_fits(bench, number, "its prompt takes", len(ids), max_length)
        out.append(ids)
    return out


@dataclass(frozen=True)
class Scored:
    value: Value | None  # the number (or yes/no) read from the final answer; None: nothing to read
    right: bool  # within the tolerance of the reference
    think_tokens: int  # tokens of the reasoning text
    answer_tokens: int  # tokens of the final answer text
    generated_tokens: int  # tokens the model generated, end-of-sequence included (`Answer.tokens`)


def score_answers(chat: Chat, bench: Benchmark, answers: list[Answer]) -> list[Scored]:
    """Each generated answer's value, whether it is right, its reasoning and final-answer lengths, and the tokens
    generated."""
    parts = [chat.split_generated(answer.text) for answer in answers]
    lengths = [len(ids) for ids in token_ids(chat.tokenizer, [text for pair in parts for text in pair])]
    out = []
    for i, (row, answer, (_, final)) in enumerate(zip(bench.rows, answers, parts, strict=True)):
        value = extract(final, yes_no=isinstance(row["answer"], str))
        right = correct(value, row["answer"], bench.rel_tolerance)
        out.append(Scored(value, right, lengths[2 * i], lengths[2 * i + 1], answer.tokens))
    return out


def numeric_scores(scored: list[Scored]) -> dict[str, float]:
    """Accuracy, extraction-failure rate, and mean reasoning, final-answer and generated tokens of some answers."""
    n = len(scored)
    return {
        "accuracy": sum(s.right for s in scored) / n,
        "extraction_failure_rate": sum(s.value is None for s in scored) / n,
        "think_tokens": sum(s.think_tokens for s in scored) / n,
        "answer_tokens": sum(s.answer_tokens for s in scored) / n,
        "generated_tokens": sum(s.generated_tokens for s in scored) / n,
    }


def numeric_metrics(bench: Benchmark, scored: dict[str, list[Scored]]) -> dict[str, Any]:
    """A numeric benchmark's numbers: rows, contaminated rows and their share, and for each model (`scored`, by
    name) `numeric_scores` on every row and on the clean rows alone (left out where every row is contaminated):
    `finqa_rows`, ..., `finqa_tuned_accuracy`, `finqa_tuned_clean_extraction_failure_rate`, ..."""
    clean = clean_rows(bench)
    out: dict[str, Any] = contamination_counts(bench)
    for model, rows in scored.items():
        out |= {f"{bench.name}_{model}_{k}": v for k, v in numeric_scores(rows).items()}
        if clean:
            out |= {f"{bench.name}_{model}_clean_{k}": v for k, v in numeric_scores([rows[i] for i in clean]).items()}
    return out


def numeric_samples(
    bench: Benchmark, answers: dict[str, list[Answer]], scored: dict[str, list[Scored]], limit: int
) -> list[dict[str, Any]]:
    """The first `limit` items side by side: question, reference, and each model's whole answer (reasoning
    included), the value read from it and whether it is right."""
    out = []
    for i, row in enumerate(bench.rows[:limit]):
        sample = {"benchmark": bench.name, "question": row["text"], "reference": row["answer"]}
        for model in answers:
            sample |= {model: answers[model][i].text, f"{model}_value": scored[model][i].value}
            sample[f"{model}_correct"] = scored[model][i].right
        out.append(sample)
    return out
