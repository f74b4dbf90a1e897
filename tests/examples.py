"""What several tests train and evaluate with: the tiny model's training settings, changed per test where it needs
to; a label benchmark and the flags of a benchmark line seen in no training row."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from finetune.evaluation.benchmark_items import Benchmark
from finetune.training.config import LoraConfig, TrainConfig

LORA = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # the seed's adapter
TINY_TRAINING = TrainConfig(  # a few constant-rate steps that move a random tiny model on a learnable toy task
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=1.0e-2,
    max_steps=25,
    num_train_epochs=1.0,
    warmup_steps=0,
    weight_decay=0.0,
    optim="adamw_torch",
    lr_scheduler_type="constant",
    logging_steps=1,
    seed=3407,
)


def tiny_training(**changes: Any) -> TrainConfig:
    """`TINY_TRAINING` with `changes`: `tiny_training(max_steps=150)`."""
    return replace(TINY_TRAINING, **changes)


SENTIMENT = Benchmark(  # a label benchmark as the benchmarks stage writes one, its rows left to each test
    name="sentiment",
    labels=["negative", "neutral", "positive"],
    instruction="Classify the sentiment.",
    rows=[],
    provenance={"source": "data/benchmarks/sentiment"},
)
CLEAN = '"exact": false, "ngram": false'  # a benchmark file line's contamination flags: seen in no training row
