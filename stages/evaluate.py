"""evaluate: does the adapter help? Base and tuned model on the same held-out rows, answers and benchmarks.

    python -m stages.evaluate --data data/standardized --adapter models/adapter \
        --metrics metrics/evaluate.json --samples metrics/evaluate_samples.json --bars metrics/evaluate_bars.csv

- loss and perplexity on the assistant's tokens only (prompt and padding masked), batched by length;
- greedy answers to `num_samples` held-out prompts: ROUGE-L and token F1 against the reference, the share that
  end with EOS before `max_new_tokens`, mean answer length;
- each local benchmark file (text + label from a fixed set): accuracy and macro-F1, the label predicted being
  the one the model finds likeliest as the answer (no free-text parsing).

The base model is the tuned one with its adapter disabled. The numbers go into the MLflow run that trained the
adapter, found by the adapter's SHA-256, and into files that `dvc metrics show` and `dvc plots show` read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages import params, scoring
from stages.chat import IGNORE_INDEX, Chat, ChatConfig
from stages.model import ModelConfig, load_base
from stages.params import require
from stages.tracking import (
    TrackingConfig,
    adapter_digest,
    report,
    store_root,
    tracking_uri,
    use_experiment,
    write_csv,
    write_json,
)

log = logging.getLogger("evaluate")


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str  # prefix of its metrics: <name>_base_accuracy, ...
    path: str  # JSONL file, one {"text": ..., "label": ...} per line
    labels: list[str]  # the fixed label set; each answer is scored as one of these
    instruction: str  # put before the text in the user turn


@dataclass(frozen=True)
class EvaluateConfig:
    max_rows: int | None  # held-out rows scored; null = all
    batch_size: int  # sequences per scoring forward pass
    num_samples: int  # held-out prompts answered greedily by both models
    max_new_tokens: int  # longest generated answer, in tokens
    generate_batch_size: int = 16  # prompts generated together
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)  # local label-set benchmarks

    def __post_init__(self) -> None:
        require(
            self.max_rows is None or self.max_rows >= 1, f"evaluate.max_rows must be >= 1 or null, got {self.max_rows}"
        )
        require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        require(self.num_samples >= 0, f"evaluate.num_samples must be >= 0, got {self.num_samples}")
        require(self.max_new_tokens >= 1, f"evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.generate_batch_size >= 1, "evaluate.generate_batch_size must be >= 1")
        benchmarks = []
        for i, raw in enumerate(self.benchmarks):
            key = f"evaluate.benchmarks[{i}]"
            require(isinstance(raw, dict | BenchmarkConfig), f"{key} must be a mapping with name, path, labels")
            bench = raw if isinstance(raw, BenchmarkConfig) else params.build(BenchmarkConfig, raw, key)
            require(bool(re.fullmatch(r"[A-Za-z0-9_]+", bench.name)), f"{key}.name must be letters, digits or _")
            require(len(set(bench.labels)) >= 2, f"{key}.labels must hold at least two distinct labels")
            benchmarks.append(bench)
        names = [b.name for b in benchmarks]
        require(len(set(names)) == len(names), f"evaluate.benchmarks: names repeat: {names}")
        object.__setattr__(self, "benchmarks", benchmarks)


def sequence_nll(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[tuple[float, int]]:
    """Per sequence of a right-padded batch: summed negative log-likelihood of its labelled tokens, their count."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).sum(dim=1)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [(float(n), int(c)) for n, c in zip(nll.tolist(), counts.tolist(), strict=True)]


def by_length(sizes: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar size, longest first: least padding, and any out-of-memory comes at once.

    `by_length([3, 9, 1, 8], 2)` -> `[[1, 3], [0, 2]]`.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def nll_per_row(
    model: Any, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """`sequence_nll` of every row, computed in batches by length, returned in the rows' order."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for batch in by_length([len(ids) for ids, _ in encoded], batch_size):
        for i, result in zip(batch, sequence_nll(model, [encoded[i] for i in batch], pad_id), strict=True):
            out[i] = result
    return out


def score(model: Any, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss per answer token over all rows, and its perplexity."""
    rows = nll_per_row(model, encoded, pad_id, batch_size)
    tokens = sum(count for _, count in rows)
    loss = sum(nll for nll, _ in rows) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


@dataclass(frozen=True)
class Answer:
    text: str  # decoded, the end-of-sequence token left out (other special tokens, </think> say, kept)
    tokens: int  # tokens generated, the end-of-sequence token included
    ended: bool  # stopped with the end-of-sequence token before max_new_tokens


def generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int
) -> list[Answer]:
    """Greedy answers to prompts given as token ids, batched by length with left padding, in the prompts' order."""
    import torch

    device = next(model.parameters()).device
    answers: list[Answer | None] = [None] * len(prompts)
    for batch in by_length([len(ids) for ids in prompts], batch_size):
        width = max(len(prompts[i]) for i in batch)
        pads = [width - len(prompts[i]) for i in batch]
        input_ids = torch.tensor(
            [[tokenizer.pad_token_id] * p + prompts[i] for p, i in zip(pads, batch, strict=True)], device=device
        )
        attention_mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads], device=device)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        for i, new in zip(batch, output[:, width:].tolist(), strict=True):
            ended = tokenizer.eos_token_id in new
            kept = new[: new.index(tokenizer.eos_token_id) + 1] if ended else new
            # special tokens are kept but EOS: </think> may be one, and final_answer needs it
            answers[i] = Answer(tokenizer.decode(kept[:-1] if ended else kept), len(kept), ended)
    return [answer for answer in answers if answer is not None]


def final_answer(text: str) -> str:
    """What follows any reasoning block, as the chat template keeps of an assistant turn."""
    return text.split("</think>")[-1].strip()


def answer_scores(answers: list[Answer], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L and token F1 against the references, share ended with EOS, mean answer length in tokens."""
    if not answers:
        return {}
    n = len(answers)
    return {
        "rouge_l": sum(scoring.rouge_l(final_answer(a.text), r) for a, r in zip(answers, references, strict=True)) / n,
        "token_f1": sum(scoring.token_f1(final_answer(a.text), r) for a, r in zip(answers, references, strict=True))
        / n,
        "eos_rate": sum(a.ended for a in answers) / n,
        "answer_tokens": sum(a.tokens for a in answers) / n,
    }


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


def evaluate_models(
    model: Any, chat: Chat, held_out: list[list[dict[str, str]]], config: EvaluateConfig, max_length: int
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Every measure of base (adapter disabled) and tuned model: the metrics and the answered samples."""
    for i, messages in enumerate(held_out):
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"held-out conversation {i} must end with an assistant turn, got {messages[-1:]!r}")
    tokenizer = chat.tokenizer
    encoded = chat.encode_many(held_out, max_length)  # as training encodes them
    prompts = [chat.prompt_ids(messages[:-1]) for messages in held_out[: config.num_samples]]
    references = [messages[-1]["content"] for messages in held_out[: config.num_samples]]
    benchmarks = [(bench, read_benchmark(bench)) for bench in config.benchmarks]

    results: dict[str, dict[str, Any]] = {}
    for name in ("base", "tuned"):
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            loss = score(model, encoded, tokenizer.pad_token_id, config.batch_size)
            answers = generate(model, tokenizer, prompts, config.max_new_tokens, config.generate_batch_size)
            predictions = {
                bench.name: classify(model, chat, bench, rows, max_length, config.batch_size)
                for bench, rows in benchmarks
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
    for bench, rows in benchmarks:
        expected = [row["label"] for row in rows]
        metrics[f"{bench.name}_rows"] = len(rows)
        for name, result in results.items():
            predicted = result["predictions"][bench.name]
            metrics[f"{bench.name}_{name}_accuracy"] = scoring.accuracy(predicted, expected)
            metrics[f"{bench.name}_{name}_macro_f1"] = scoring.macro_f1(predicted, expected, bench.labels)
    samples = [
        {
            "prompt": messages[-2]["content"],
            "reference": reference,
            "base": b.text,
            "tuned": t.text,
            "base_rouge_l": scoring.rouge_l(final_answer(b.text), reference),
            "tuned_rouge_l": scoring.rouge_l(final_answer(t.text), reference),
            "base_ended": b.ended,
            "tuned_ended": t.ended,
        }
        for messages, reference, b, t in zip(
            held_out[: len(references)], references, base["answers"], tuned["answers"], strict=True
        )
    ]
    return metrics, samples


BAR_MEASURES = ("loss", "rouge_l", "token_f1", "eos_rate")
MODELS = ("base", "tuned")


def bar_rows(metrics: dict[str, float | int], benchmarks: list[BenchmarkConfig]) -> list[dict[str, Any]]:
    """Base and tuned side by side for `dvc plots show`'s bar chart: one row per measure and model.

    `bar_rows({"base_loss": 2.0, "tuned_loss": 1.5}, [])`
    -> `[{"measure": "loss · base", "value": 2.0}, {"measure": "loss · tuned", "value": 1.5}]`
    """
    keys = [(measure, {m: f"{m}_{measure}" for m in MODELS}) for measure in BAR_MEASURES] + [
        (f"{b.name} {kind}", {m: f"{b.name}_{m}_{kind}" for m in MODELS})
        for b in benchmarks
        for kind in ("accuracy", "macro_f1")
    ]
    return [
        {"measure": f"{measure} · {m}", "value": metrics[key[m]]}
        for measure, key in keys
        for m in MODELS
        if key[m] in metrics
    ]


def find_training_run(experiment_name: str, digest: str) -> str | None:
    """The newest MLflow run of the experiment whose adapter has this SHA-256, or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment_name],
        filter_string=f"tags.adapter_sha256 = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def main(params_path: Path, data: Path, adapter: Path, metrics: Path, samples: Path, bars: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from unsloth import FastLanguageModel

    model_config = params.load(ModelConfig, params_path, "model")
    chat_config = params.load(ChatConfig, params_path, "chat")
    config = params.load(EvaluateConfig, params_path, "evaluate")
    tracking = params.load(TrackingConfig, params_path, "tracking")
    log.info(
        "config: %s",
        {
            **params.flatten("model", model_config),
            **params.flatten("chat", chat_config),
            **params.flatten("evaluate", config),
        },
    )

    # --- data: single-turn held-out conversations
    held_out = Dataset.from_parquet(str(data / "eval.parquet"))
    if config.max_rows is not None:
        held_out = held_out.select(range(min(config.max_rows, len(held_out))))

    # --- models: the tuned model; the base model is the same with the adapter disabled
    model, tokenizer = load_base(model_config)
    model = PeftModel.from_pretrained(model, str(adapter))
    FastLanguageModel.for_inference(model)
    chat = Chat(tokenizer, chat_config)
    chat.check(padding=True)
    start = time.perf_counter()
    results, sample_rows = evaluate_models(model, chat, held_out["conversations"], config, model_config.max_seq_length)
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
        write_json(samples, {"samples": sample_rows})
        write_csv(bars, bar_rows(results, config.benchmarks), ("measure", "value"))
        mlflow.log_artifact(str(bars), artifact_path="evaluate")
        if sample_rows:
            mlflow.log_table(
                {key: [row[key] for row in sample_rows] for key in sample_rows[0]}, "evaluate_samples.json"
            )
    log.info("metrics -> %s, samples -> %s, bars -> %s", metrics, samples, bars)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--bars", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.adapter, args.metrics, args.samples, args.bars)
