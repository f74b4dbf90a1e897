"""evaluate: does the adapter help? Base and tuned model on the same held-out rows, answers and benchmarks.

    python -m stages.evaluate --data data/tokenized --texts data/standardized --benchmarks data/benchmark_items \
        --adapter models/adapter --metrics metrics/evaluate.json --samples metrics/evaluate_samples.json \
        --bars metrics/evaluate_bars.csv

- loss and perplexity on the held-out conversations' learnt tokens, as the tokenize stage encoded them
  (`stages.likelihood`);
- greedy answers to the first `num_samples` held-out prompts: ROUGE-L and token F1 against the reference, the
  share that end with EOS before `max_new_tokens`, mean answer length (`stages.answers`);
- each benchmark the benchmarks stage prepared (text + label from a fixed set): accuracy and macro-F1, the label
  predicted being the one the model finds likeliest as the answer, on every item and on the items not found in
  the training data (`stages.label_benchmarks`), with the share that was found there.

The base model is the tuned one with its adapter disabled, loaded in the precision the adapter was trained in.
The numbers go into the MLflow run that trained the adapter, found by the adapter's SHA-256
(`stages.tracking.find_training_run`), and into files that `dvc metrics show` and `dvc plots show` read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import params
from stages.answers import answer_scores, final_answer, generate
from stages.chat import Chat, ChatConfig
from stages.files import write_csv, write_json
from stages.label_benchmarks import Benchmark, benchmark_metrics, classify, read_benchmarks
from stages.likelihood import Encoded, score
from stages.model import ModelConfig, load_base, trained_precision
from stages.params import require
from stages.scoring import rouge_l
from stages.tracking import (
    MAX_TAG_VALUE,
    TrackingConfig,
    adapter_digest,
    find_training_run,
    report,
    storable,
    store_root,
    tracking_uri,
    use_experiment,
)

log = logging.getLogger("evaluate")


@dataclass(frozen=True)
class EvaluateConfig:
    max_rows: int | None  # held-out rows scored; null = all
    batch_size: int  # sequences per scoring forward pass
    num_samples: int  # held-out prompts answered greedily by both models
    max_new_tokens: int  # longest generated answer, in tokens
    generate_batch_size: int = 16  # prompts generated together

    def __post_init__(self) -> None:
        require(
            self.max_rows is None or self.max_rows >= 1, f"evaluate.max_rows must be >= 1 or null, got {self.max_rows}"
        )
        require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        require(self.num_samples >= 0, f"evaluate.num_samples must be >= 0, got {self.num_samples}")
        require(self.max_new_tokens >= 1, f"evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.generate_batch_size >= 1, "evaluate.generate_batch_size must be >= 1")


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]  # the prompt of the conversation's last answer, as the tokenize stage encoded it
    question: str  # the last user turn, for the samples table
    reference: str  # the last answer as the data has it


def samples(rows: list[dict[str, Any]], conversations: list[list[dict[str, str]]], limit: int) -> list[Sample]:
    """The first `limit` held-out rows whose whole prompt was kept (a row cut inside its prompt is passed over):
    `rows` as the tokenize stage wrote them (`row`, `input_ids`, `prompt_length`), their texts in `conversations`,
    indexed by `row`."""
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
    return out


def evaluate_models(
    model: Any,
    chat: Chat,
    encoded: list[Encoded],
    prompts: list[Sample],
    benchmarks: list[Benchmark],
    config: EvaluateConfig,
    max_length: int,
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Every measure of base (adapter disabled) and tuned model: the metrics and the answered samples."""
    tokenizer = chat.tokenizer
    references = [sample.reference for sample in prompts]

    results: dict[str, dict[str, Any]] = {}
    for name in ("base", "tuned"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            loss = score(model, encoded, tokenizer.pad_token_id, config.batch_size)
            answers = generate(
                model, tokenizer, [s.prompt_ids for s in prompts], config.max_new_tokens, config.generate_batch_size
            )
            predictions = {
                bench.name: classify(model, chat, bench, max_length, config.batch_size) for bench in benchmarks
            }
        results[name] = {"loss": loss, "answers": answers, "predictions": predictions}

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
    for name, result in results.items():
        metrics |= {f"{name}_{key}": value for key, value in answer_scores(result["answers"], references).items()}
    for bench in benchmarks:
        metrics |= benchmark_metrics(
            bench, {name: result["predictions"][bench.name] for name, result in results.items()}
        )
    sample_rows = [
        {
            "prompt": sample.question,
            "reference": sample.reference,
            "base": b.text,
            "tuned": t.text,
            "base_rouge_l": rouge_l(final_answer(b.text), sample.reference),
            "tuned_rouge_l": rouge_l(final_answer(t.text), sample.reference),
            "base_ended": b.ended,
            "tuned_ended": t.ended,
        }
        for sample, b, t in zip(prompts, base["answers"], tuned["answers"], strict=True)
    ]
    return metrics, sample_rows


BAR_MEASURES = ("loss", "rouge_l", "token_f1", "eos_rate")
MODELS = ("base", "tuned")


def bar_rows(metrics: dict[str, float | int], benchmarks: list[str]) -> list[dict[str, Any]]:
    """Base and tuned side by side for `dvc plots show`'s bar chart: one row per measure and model, the
    benchmarks' (by name) accuracy and macro-F1 on every item and on the clean ones.

    `bar_rows({"base_loss": 2.0, "tuned_loss": 1.5}, [])`
    -> `[{"measure": "loss · base", "value": 2.0}, {"measure": "loss · tuned", "value": 1.5}]`
    """
    keys = [(measure, {m: f"{m}_{measure}" for m in MODELS}) for measure in BAR_MEASURES] + [
        (f"{name} {kind.replace('_', ' ')}", {m: f"{name}_{m}_{kind}" for m in MODELS})
        for name in benchmarks
        for kind in ("accuracy", "macro_f1", "clean_accuracy", "clean_macro_f1")
    ]
    return [
        {"measure": f"{measure} · {m}", "value": metrics[key[m]]}
        for measure, key in keys
        for m in MODELS
        if key[m] in metrics
    ]


def check_finite(adapter: Path) -> None:
    """Refuse an adapter with a NaN or infinite weight (a diverged training's), naming the first such tensor."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118  # safe_open is not a mapping
            if not weights.get_tensor(name).isfinite().all():
                raise ValueError(
                    f"{adapter}: {name} holds NaN or infinite values: the training that wrote it diverged; "
                    "train again with a lower train.learning_rate"
                )


def main(
    params_path: Path,
    data: Path,
    texts: Path,
    benchmark_items: Path,
    adapter: Path,
    metrics: Path,
    samples_path: Path,
    bars: Path,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from unsloth import FastLanguageModel

    check_finite(adapter)
    chat_config = params.load(ChatConfig, params_path, "chat")
    config = params.load(EvaluateConfig, params_path, "evaluate")
    tracking = params.load(TrackingConfig, params_path, "tracking")
    model_config = trained_precision(params.load(ModelConfig, params_path, "model"), adapter)
    log.info(
        "config: %s",
        {
            **params.flatten("model", model_config),
            **params.flatten("chat", chat_config),
            **params.flatten("evaluate", config),
        },
    )

    # --- data: the held-out conversations as the tokenize stage encoded them, their texts for the samples
    held_out = Dataset.from_file(str(data / "eval.arrow"))
    if config.max_rows is not None:
        held_out = held_out.select(range(min(config.max_rows, len(held_out))))
    rows = held_out.to_list()
    encoded = [(row["input_ids"], row["labels"]) for row in rows]
    conversations = Dataset.from_parquet(str(texts / "eval.parquet"))["conversations"]
    prompts = samples(rows, conversations, config.num_samples)
    benchmarks = read_benchmarks(benchmark_items)

    # --- models: the tuned model; the base model is the same with the adapter disabled
    model, tokenizer = load_base(model_config)
    model = PeftModel.from_pretrained(model, str(adapter))
    FastLanguageModel.for_inference(model)
    chat = Chat(tokenizer, chat_config)
    chat.check(padding=True)
    start = time.perf_counter()
    results, sample_rows = evaluate_models(
        model, chat, encoded, prompts, benchmarks, config, model_config.max_seq_length
    )
    results["evaluate_seconds"] = time.perf_counter() - start
    if torch.cuda.is_available():
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # --- outputs: metrics, samples and bars, into the training's MLflow run
    root = store_root(os.environ, Path.cwd())
    use_experiment(tracking_uri(os.environ, root), tracking.experiment_name, root / "mlartifacts")
    run_id = find_training_run(tracking.experiment_name, adapter_digest(adapter))
    if run_id is None:
        log.warning("no MLflow run holds this adapter (store deleted?): recording evaluation in a new run")
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate-only"):
        report(results, metrics, prefix="evaluate")
        mlflow.set_tags(
            {
                f"benchmark.{bench.name}.{key}": storable(value, MAX_TAG_VALUE)
                for bench in benchmarks
                for key, value in bench.provenance.items()
            }
        )
        write_json(samples_path, {"samples": sample_rows})
        write_csv(bars, bar_rows(results, [b.name for b in benchmarks]), ("measure", "value"))
        mlflow.log_artifact(str(bars), artifact_path="evaluate")
        if sample_rows:
            mlflow.log_table(
                {key: [row[key] for row in sample_rows] for key in sample_rows[0]}, "evaluate_samples.json"
            )
    log.info("metrics -> %s, samples -> %s, bars -> %s", metrics, samples_path, bars)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="folder of the tokenize stage's Arrow files")
    parser.add_argument("--texts", type=Path, required=True, help="folder of the standardized conversations")
    parser.add_argument("--benchmarks", type=Path, required=True, help="folder of the benchmarks stage's files")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--bars", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.texts, args.benchmarks, args.adapter, args.metrics, args.samples, args.bars)
