"""evaluate: does the adapter help? Base and tuned model on the same held-out rows, answers and benchmarks.

    python -m stages.evaluate --data data/tokenized --texts data/standardized --benchmarks data/benchmark_items \
        --adapter models/adapter --metrics metrics/evaluate.json --samples metrics/evaluate_samples.json \
        --bars metrics/evaluate_bars.csv

- loss and perplexity on the held-out conversations' learnt tokens, as the tokenize stage encoded them
  (`finetune.evaluation.likelihood`);
- greedy answers to the first `num_samples` held-out prompts: ROUGE-L and token F1 against the reference, the
  share that end with EOS before `max_new_tokens`, mean answer length (`finetune.evaluation.answers`);
- each label set the benchmarks stage prepared (text + label from a fixed set): accuracy and macro-F1, the label
  predicted being the one the model finds likeliest as the answer (`finetune.evaluation.label_sets`);
- each numeric benchmark (a question with a number as its answer, FinQA): greedy answers reasoning up to
  `benchmarks.max_new_tokens`, the number after the reasoning block scored against the reference (accuracy, the
  share with no number, reasoning and answer lengths: `finetune.evaluation.numeric_sets`);
- both kinds on every item and on the items not found in the training data, with the share that was found there.

The base model is the tuned one with its adapter disabled, loaded in the precision the adapter was trained in.
With `evaluate.devices` above 1 the stage starts again as that many processes under torchrun, each scoring every
N-th item; rank 0 gathers the results and alone writes.
The numbers go into the MLflow run that trained the adapter, found by the adapter's SHA-256
(`finetune.tracking.adapter_run`), and into files that `dvc metrics show` and `dvc plots show` read.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from finetune.config import cli
from finetune.config.params import flatten, load, scored_rows
from finetune.data.files import write_csv, write_json
from finetune.evaluation.base_vs_tuned import (
    BAR_COLUMNS,
    EvaluateConfig,
    bar_rows,
    benchmark_inputs,
    evaluate_models,
    held_out_samples,
)
from finetune.evaluation.benchmark_items import read_benchmarks
from finetune.model.load import (
    ModelConfig,
    load_tokenizer,
    load_with_adapter,
    trained_precision,
    with_trained_template,
)
from finetune.model.patches import apply_speed_patches
from finetune.tokens.chat import Chat, ChatConfig
from finetune.tracking.adapter_run import adapter_run
from finetune.tracking.records import MAX_TAG_VALUE, report, storable
from finetune.tracking.store import TrackingConfig
from finetune.training.adapter import check_finite
from finetune.training.distributed import World, process_group, start_processes

log = logging.getLogger("evaluate")


def main(
    params_path: Path,
    data: Path,
    texts: Path,
    benchmarks: Path,
    adapter: Path,
    metrics: Path,
    samples: Path,
    bars: Path,
) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    import torch
    from datasets import Dataset
    from unsloth import FastLanguageModel

    # --- settings; an adapter with a non-finite weight is refused before anything loads
    check_finite(adapter)
    chat_config = load(ChatConfig, params_path, "chat")
    config = load(EvaluateConfig, params_path, "evaluate")
    tracking = load(TrackingConfig, params_path, "tracking")
    model_config = load(ModelConfig, params_path, "model")

    # --- data: the held-out conversations as the tokenize stage encoded them, their texts for the samples
    held_out = Dataset.from_file(str(data / "eval.arrow"))
    if config.max_rows is not None:
        held_out = held_out.select(range(scored_rows("evaluate.max_rows", len(held_out), config.max_rows)))
    rows = held_out.to_list()
    encoded = [(row["input_ids"], row["labels"]) for row in rows]
    conversations = Dataset.from_parquet(str(texts / "eval.parquet"))["conversations"]
    prompts = held_out_samples(rows, conversations, config.num_samples)
    sets = read_benchmarks(benchmarks)
    # every benchmark item encoded and checked against model.max_seq_length before the model loads (minutes for the
    # 8B): with the base's tokenizer and the adapter's template, which encode as the model's (train checked it); an
    # adapter of another base is refused first (`trained_precision`)
    early = Chat(with_trained_template(load_tokenizer(trained_precision(model_config, adapter)), adapter), chat_config)
    inputs = benchmark_inputs(early, sets, model_config.max_seq_length)

    # --- models: the tuned model, in the precision it was trained in; the base is it with the adapter disabled. One
    # of several processes (evaluate.devices) loads it onto its own GPU and scores every N-th item of each kind
    world = World.from_environ(dict(os.environ))
    apply_speed_patches()
    model, tokenizer, model_config = load_with_adapter(model_config, adapter, world.gpu)
    log.info(
        "config: %s", {**flatten("model", model_config), **flatten("chat", chat_config), **flatten("evaluate", config)}
    )
    FastLanguageModel.for_inference(model)
    chat = Chat(tokenizer, chat_config)
    chat.check(padding=True)
    start = time.perf_counter()
    with process_group(world):
        results, sample_rows, benchmark_rows = evaluate_models(
            model, chat, encoded, prompts, sets, config, model_config.max_seq_length, world, inputs
        )
    results["evaluate_seconds"] = time.perf_counter() - start
    if not world.main:  # rank 0 has every process's results, and writes
        return
    gpus = torch.cuda.is_available()
    if gpus:
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # --- outputs: metrics, samples and bars, into the training's MLflow run
    with adapter_run(tracking, adapter, os.environ):
        report(results, metrics, prefix="evaluate")
        provenance = {f"benchmark.{b.name}.{key}": value for b in sets for key, value in b.provenance.items()}
        mlflow.set_tags({key: storable(value, MAX_TAG_VALUE) for key, value in provenance.items()})
        mlflow.set_tag("evaluate.gpus", os.environ.get("CUDA_VISIBLE_DEVICES", "all") if gpus else "none")
        mlflow.set_tag("evaluate.world_size", world.size)
        write_json(samples, {"samples": sample_rows, "benchmark_samples": benchmark_rows})
        write_csv(bars, bar_rows(results, [b.name for b in sets]), BAR_COLUMNS)
        mlflow.log_artifact(str(bars), artifact_path="evaluate")
        for rows, name in ((sample_rows, "evaluate_samples.json"), (benchmark_rows, "evaluate_benchmark_samples.json")):
            if rows:  # a table the MLflow UI shows, each model's answer beside the reference
                mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, name)
    log.info("metrics -> %s, samples (held-out and numeric benchmarks) -> %s, bars -> %s", metrics, samples, bars)


if __name__ == "__main__":
    paths = cli.arguments(
        __doc__,
        data="folder of the tokenize stage's Arrow files",
        texts="folder of the standardized conversations",
        benchmarks="folder of the benchmarks stage's files",
        adapter="the trained adapter's folder",
        metrics="the stage's metrics, JSON",
        samples="the answered samples, held-out and of the numeric benchmarks, JSON",
        bars="base vs. tuned, CSV for the bar chart",
    )
    # its GPUs, leased; more than one, or other machines to meet: started again as that many processes
    params = paths["params_path"]
    start_processes("evaluate", params, load(EvaluateConfig, params, "evaluate").devices)
    main(**paths)
