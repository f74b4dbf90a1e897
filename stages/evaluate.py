"""evaluate: held-out loss and perplexity of the base and the tuned model, and sample answers from both.

    python -m stages.evaluate --data data/standardized --adapter models/adapter \
        --metrics metrics/evaluate.json --samples metrics/evaluate_samples.json

Both models score exactly the same held-out rows, on the assistant's tokens only (prompt and padding are
masked); the base model is the tuned one with its adapter disabled. The numbers go into the MLflow run that
trained the adapter, found by the adapter's SHA-256.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import params
from stages.model import ModelConfig, load_base
from stages.params import require
from stages.tracking import TrackingConfig, adapter_digest, report, store_root, tracking_uri, use_experiment, write_json

log = logging.getLogger("evaluate")

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EvaluateConfig:
    max_rows: int | None  # held-out rows scored; null = all
    batch_size: int  # sequences per scoring forward pass
    num_samples: int  # held-out prompts answered greedily by both models
    max_new_tokens: int  # longest generated answer, in tokens

    def __post_init__(self) -> None:
        require(
            self.max_rows is None or self.max_rows >= 1, f"evaluate.max_rows must be >= 1 or null, got {self.max_rows}"
        )
        require(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        require(self.num_samples >= 0, f"evaluate.num_samples must be >= 0, got {self.num_samples}")
        require(self.max_new_tokens >= 1, f"evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def prompt_and_answer(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """Split a rendered conversation into the prompt and the final answer, as the model was trained on it.

    The prompt is the longest common prefix of the full rendering and the rendering of the earlier turns with
    the generation prompt, so it ends where the chat template starts the answer (`...<｜Assistant｜>` for
    DeepSeek); the answer is the rest, end-of-turn token included.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"a held-out conversation must end with an assistant turn, got {messages[-1:]!r}")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    opening = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    cut = len(os.path.commonprefix([full, opening]))
    return full[:cut], full[cut:]


def encode(tokenizer: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer and their labels (-100 on the prompt), cut to `max_length` tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def batch_nll(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens of a right-padded batch, and their count."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(nll), int((targets != IGNORE_INDEX).sum())


def score(model: Any, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss per answer token over all rows, and its perplexity."""
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        nll, count = batch_nll(model, encoded[start : start + batch_size], pad_id)
        total, tokens = total + nll, tokens + count
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding, special tokens removed."""
    import torch

    if not prompts:
        return []
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
        next(model.parameters()).device
    )
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


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


def main(params_path: Path, data: Path, adapter: Path, metrics: Path, samples: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    from datasets import Dataset
    from peft import PeftModel
    from unsloth import FastLanguageModel

    model_config = params.load(ModelConfig, params_path, "model")
    config = params.load(EvaluateConfig, params_path, "evaluate")
    tracking = params.load(TrackingConfig, params_path, "tracking")
    log.info("config: %s", {**params.flatten("model", model_config), **params.flatten("evaluate", config)})

    # --- data: single-turn held-out conversations, split into prompt and reference answer
    held_out = Dataset.from_parquet(str(data / "eval.parquet"))
    if config.max_rows is not None:
        held_out = held_out.select(range(min(config.max_rows, len(held_out))))

    # --- models: the tuned model; the base model is the same with the adapter disabled
    model, tokenizer = load_base(model_config)
    model = PeftModel.from_pretrained(model, str(adapter))
    FastLanguageModel.for_inference(model)
    pairs = [prompt_and_answer(tokenizer, row["conversations"]) for row in held_out]
    encoded = [encode(tokenizer, prompt, answer, model_config.max_seq_length) for prompt, answer in pairs]

    with model.disable_adapter():
        base = score(model, encoded, tokenizer.pad_token_id, config.batch_size)
    tuned = score(model, encoded, tokenizer.pad_token_id, config.batch_size)

    prompts = [prompt for prompt, _ in pairs[: config.num_samples]]
    with model.disable_adapter():
        base_answers = generate(model, tokenizer, prompts, config.max_new_tokens)
    tuned_answers = generate(model, tokenizer, prompts, config.max_new_tokens)
    sample_rows = [
        {
            "prompt": row["conversations"][-2]["content"],
            "reference": row["conversations"][-1]["content"],
            "base": b,
            "tuned": t,
        }
        for row, b, t in zip(held_out.select(range(len(prompts))), base_answers, tuned_answers, strict=True)
    ]

    # --- outputs: metrics and samples, into the training's MLflow run
    root = store_root(os.environ, Path.cwd())
    use_experiment(tracking_uri(os.environ, root), tracking.experiment_name, root / "mlartifacts")
    run_id = find_training_run(tracking.experiment_name, adapter_digest(adapter))
    if run_id is None:
        log.warning("no MLflow run holds this adapter (store deleted?): recording evaluation in a new run")
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate-only"):
        report(
            {
                "eval_rows": len(encoded),
                "eval_tokens": tuned["tokens"],
                "base_loss": base["loss"],
                "base_perplexity": base["perplexity"],
                "tuned_loss": tuned["loss"],
                "tuned_perplexity": tuned["perplexity"],
                "loss_change_pct": 100.0 * (tuned["loss"] - base["loss"]) / base["loss"],
            },
            metrics,
            prefix="evaluate",
        )
        write_json(samples, {"samples": sample_rows})
        if sample_rows:
            mlflow.log_table(
                {key: [row[key] for row in sample_rows] for key in sample_rows[0]}, "evaluate_samples.json"
            )
    log.info("metrics -> %s, samples -> %s", metrics, samples)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.adapter, args.metrics, args.samples)
