"""Base and tuned model measured alike: the `evaluate` section, the held-out samples, every measure of both models
(the base is the tuned one with its adapter disabled) and the rows of the base-vs-tuned bar chart."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from finetune.config.params import require
from finetune.evaluation.answers import answer_scores, generate
from finetune.evaluation.benchmark_items import Benchmark
from finetune.evaluation.label_sets import classify, label_choices, label_metrics
from finetune.evaluation.likelihood import Encoded, mean_loss, nll_per_row
from finetune.evaluation.numeric_sets import numeric_metrics, numeric_prompts, numeric_samples, score_answers
from finetune.evaluation.scoring import rouge_l
from finetune.tokens.chat import Chat
from finetune.training.distributed import World, gather_shards, processes, shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    max_rows: int | None  # held-out rows scored; null = all
    batch_tokens: int  # tokens per scoring forward pass (rows x the longest of them)
    num_samples: int  # held-out prompts answered greedily by both models
    max_new_tokens: int  # longest generated answer, in tokens
    generate_batch_size: int = 16  # prompts generated together
    benchmark_batch_tokens: int = 393216  # numeric benchmarks: prompts x (longest + max_new_tokens) generated together
    devices: str | int = "auto"  # processes scoring, one per GPU: auto (every visible one) or a number

    def __post_init__(self) -> None:
        require(
            self.max_rows is None or self.max_rows >= 1, f"evaluate.max_rows must be >= 1 or null, got {self.max_rows}"
        )
        require(self.batch_tokens >= 1, f"evaluate.batch_tokens must be >= 1, got {self.batch_tokens}")
        require(self.num_samples >= 0, f"evaluate.num_samples must be >= 0, got {self.num_samples}")
        require(self.max_new_tokens >= 1, f"evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.generate_batch_size >= 1, "evaluate.generate_batch_size must be >= 1")
        require(
            self.benchmark_batch_tokens >= 1,
            f"evaluate.benchmark_batch_tokens must be >= 1, got {self.benchmark_batch_tokens}",
        )
        processes(self.devices, visible_gpus=0, key="evaluate.devices")  # checked against the GPUs at launch


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]  # the prompt of the conversation's last answer, as the tokenize stage encoded it
    question: str  # the last user turn, for the samples table
    reference: str  # the last answer as the data has it


def held_out_samples(rows: list[dict[str, Any]], conversations: list[list[dict[str, str]]], limit: int) -> list[Sample]:
    """The first `limit` held-out rows whose whole prompt was kept (a row cut inside its prompt is passed over; fewer,
    said, where fewer are whole): `rows` as the tokenize stage wrote them (`row`, `input_ids`, `prompt_length`), their
    texts in `conversations`, indexed by `row`."""
    out = []
    for row in rows:
        if len(out) == limit:
            break
        if row["prompt_length"] < len(row["input_ids"]):
            messages = conversations[row["row"]]
            require(
                messages[-1]["role"] == "assistant",
                f"held-out conversation {row['row']} must end with an assistant turn, got {messages[-1:]!r}",
            )
            out.append(
                Sample(row["input_ids"][: row["prompt_length"]], messages[-2]["content"], messages[-1]["content"])
            )
    if len(out) < limit:
        log.warning(
            "evaluate.num_samples is %d but only %d held-out prompts are whole: answering %d", limit, len(out), len(out)
        )
    return out


@dataclass(frozen=True)
class BenchmarkInputs:
    asked: dict[str, list[list[int]]]  # each numeric benchmark's prompts, as token ids
    choices: dict[str, list[list[Encoded]]]  # each label set's items, every label encoded as the answer


def benchmark_inputs(chat: Chat, benchmarks: list[Benchmark], max_length: int) -> BenchmarkInputs:
    """Every benchmark item's tokens, each checked against `max_length` (an error names the benchmark and the row)."""
    return BenchmarkInputs(
        {bench.name: numeric_prompts(chat, bench, max_length) for bench in benchmarks if bench.kind == "numeric"},
        {bench.name: label_choices(chat, bench, max_length) for bench in benchmarks if bench.kind == "labels"},
    )


def evaluate_models(
    model: Any,
    chat: Chat,
    encoded: list[Encoded],
    prompts: list[Sample],
    benchmarks: list[Benchmark],
    config: EvaluateConfig,
    max_length: int,
    world: World | None = None,
    inputs: BenchmarkInputs | None = None,
) -> tuple[dict[str, float | int], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every measure of base (adapter disabled) and tuned model: the metrics, the answered held-out samples and the
    answered samples of the numeric benchmarks (their first `num_samples` items each). One of several processes
    (`world`) scores every N-th item of each kind, and every process gets the results of all of them. The benchmark
    items' tokens (`inputs`) are encoded here where not given (the stage encodes them before the model loads)."""
    tokenizer, world = chat.tokenizer, world or World()
    references = [sample.reference for sample in prompts]
    inputs = inputs or benchmark_inputs(chat, benchmarks, max_length)
    asked, choices = inputs.asked, inputs.choices

    def gathered(what: str, count: int, clock: float, mine: list[Any]) -> list[Any]:
        out = gather_shards(mine, world)  # every process's results, in the items' order
        log.info("%s, %d items in %.1f s", what, count, time.perf_counter() - clock)
        return out

    results: dict[str, dict[str, Any]] = {}
    for name in ("base", "tuned"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            clock = time.perf_counter()
            mine = nll_per_row(model, shard(encoded, world), tokenizer.pad_token_id, config.batch_tokens)
            rows = gathered(f"{name}: held-out loss", len(encoded), clock, mine)
            clock = time.perf_counter()
            asked_samples = shard([sample.prompt_ids for sample in prompts], world)
            mine = generate(model, tokenizer, asked_samples, config.max_new_tokens, config.generate_batch_size)
            answers = gathered(f"{name}: answers", len(prompts), clock, mine)
            predictions = {}
            for bench in benchmarks:  # a label set's predicted labels, a numeric benchmark's generated answers
                clock = time.perf_counter()
                if bench.kind == "labels":
                    mine = classify(model, bench.labels or [], shard(choices[bench.name], world), config.batch_tokens)
                else:
                    mine = generate(
                        model,
                        tokenizer,
                        shard(asked[bench.name], world),
                        bench.max_new_tokens,
                        batch_tokens=config.benchmark_batch_tokens,
                    )
                predictions[bench.name] = gathered(f"{name}: {bench.name}", len(bench.rows), clock, mine)
        results[name] = {"loss": mean_loss(rows), "answers": answers, "predictions": predictions}

    base, tuned = results["base"], results["tuned"]
    metrics: dict[str, float | int] = {
        "eval_rows": len(encoded),
        "eval_tokens": tuned["loss"]["tokens"],
        "base_loss": base["loss"]["loss"],
        "base_perplexity": base["loss"]["perplexity"],
        "tuned_loss": tuned["loss"]["loss"],
        "tuned_perplexity": tuned["loss"]["perplexity"],
        "loss_change_pct": 100.0 * (tuned["loss"]["loss"] - base["loss"]["loss"]) / base["loss"]["loss"],
        "generated_samples": len(prompts),
    }
    finals = {name: [chat.split_generated(a.text)[1] for a in result["answers"]] for name, result in results.items()}
    for name, result in results.items():
        scores = answer_scores(result["answers"], finals[name], references)
        metrics |= {f"{name}_{key}": value for key, value in scores.items()}
    benchmark_rows = []
    for bench in benchmarks:
        predicted = {name: result["predictions"][bench.name] for name, result in results.items()}
        if bench.kind == "labels":
            metrics |= label_metrics(bench, predicted)
            continue
        scored = {name: score_answers(chat, bench, answers) for name, answers in predicted.items()}
        metrics |= numeric_metrics(bench, scored)
        benchmark_rows += numeric_samples(bench, predicted, scored, config.num_samples)
    sample_rows = [
        {
            "prompt": sample.question,
            "reference": sample.reference,
            "base": b.text,
            "tuned": t.text,
            "base_rouge_l": rouge_l(base_final, sample.reference),
            "tuned_rouge_l": rouge_l(tuned_final, sample.reference),
            "base_ended": b.ended,
            "tuned_ended": t.ended,
        }
        for sample, b, t, base_final, tuned_final in zip(
            prompts, base["answers"], tuned["answers"], finals["base"], finals["tuned"], strict=True
        )
    ]
    return metrics, sample_rows, benchmark_rows


# the measures of the base-vs-tuned bars, by the panel that draws them (.dvc/plots/base_vs_tuned.json): loss and
# perplexity each on an axis of their own, the scores from 0 to 1 on one axis (the benchmarks' are added by name)
BAR_PANELS = {"loss": ("loss",), "perplexity": ("perplexity",), "score": ("rouge_l", "token_f1", "eos_rate")}
BAR_COLUMNS = ("panel", "measure", "model", "value")  # metrics/evaluate_bars.csv's header
MODELS = ("base", "tuned")


def bar_rows(metrics: dict[str, float | int], benchmarks: list[str]) -> list[dict[str, Any]]:
    """Base and tuned side by side for `dvc plots show`'s bar chart: one row per measure and model with the panel
    that draws it (`BAR_PANELS`); the benchmarks' (by name) accuracy and macro-F1 on every item and on the clean
    ones among the scores.

    `bar_rows({"base_loss": 2.0, "tuned_loss": 1.5}, [])` -> `[{"panel": "loss", "measure": "loss", "model": "base",
    "value": 2.0}, {"panel": "loss", "measure": "loss", "model": "tuned", "value": 1.5}]`
    """
    # (panel, measure, its metric's name with a slot for the model)
    keys = [(panel, measure, f"{{model}}_{measure}") for panel, measures in BAR_PANELS.items() for measure in measures]
    keys += [
        ("score", f"{name} {kind.replace('_', ' ')}", f"{name}_{{model}}_{kind}")
        for name in benchmarks
        for kind in ("accuracy", "macro_f1", "clean_accuracy", "clean_macro_f1", "extraction_failure_rate")
    ]
    return [
        {"panel": panel, "measure": measure, "model": model, "value": metrics[key.format(model=model)]}
        for panel, measure, key in keys
        for model in MODELS
        if key.format(model=model) in metrics
    ]
