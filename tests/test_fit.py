"""fit: `auto` settings from the GPU's memory; the effective batch is always kept."""

from __future__ import annotations

import pytest
from examples import tiny_training

from finetune.model.fit import (
    GIB,
    Shape,
    activation_bytes_per_token,
    load_in_4bit,
    plan,
    plan_by_tokens,
    weight_bytes,
)
from finetune.model.load import ModelConfig, precision_flags
from finetune.training.config import training_arguments

LLAMA_8B = Shape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied=False)
H100 = int(79.2 * GIB)


def test_the_8b_shape_weighs_what_the_model_does() -> None:
    assert weight_bytes(LLAMA_8B, four_bit=False) / 1e9 == pytest.approx(16.06, abs=0.05)  # 8.03 B parameters
    assert 5.0 < weight_bytes(LLAMA_8B, four_bit=True) / GIB < 6.0  # measured: 5.7 GiB with the seed's settings
    per_token = activation_bytes_per_token(LLAMA_8B, checkpointing=False)
    assert per_token / 2**20 == pytest.approx(4.25, abs=0.05)  # measured: 4.25 MiB a token
    assert activation_bytes_per_token(LLAMA_8B, checkpointing="unsloth") < per_token / 10


def test_on_an_h100_the_8b_trains_in_16_bit_without_checkpointing_in_micro_batches_of_4() -> None:
    four_bit = load_in_4bit("auto", LLAMA_8B, H100)
    chosen = plan(LLAMA_8B, H100, four_bit, "auto", "auto", per_device=2, accumulation=4, max_length=2048)
    assert four_bit is False
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size) == (False, 4)
    assert chosen.per_device_train_batch_size * chosen.gradient_accumulation_steps == 8  # the effective batch


@pytest.mark.parametrize(
    ("gib", "four_bit", "checkpointing", "micro"),
    [(24, True, False, 1), (16, True, "unsloth", 8), (12, True, "unsloth", 4)],
)
def test_smaller_gpus_get_4_bit_then_checkpointing(gib: int, four_bit: bool, checkpointing, micro: int) -> None:
    chosen_4bit = load_in_4bit("auto", LLAMA_8B, gib * GIB)
    chosen = plan(LLAMA_8B, gib * GIB, chosen_4bit, "auto", "auto", per_device=8, accumulation=1, max_length=2048)
    assert chosen_4bit is four_bit
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size) == (checkpointing, micro)
    assert chosen.per_device_train_batch_size * chosen.gradient_accumulation_steps == 8


def test_settings_that_are_not_auto_are_kept() -> None:
    assert load_in_4bit(True, LLAMA_8B, H100) is True and load_in_4bit(False, LLAMA_8B, 8 * GIB) is False
    chosen = plan(LLAMA_8B, H100, False, "unsloth", None, per_device=2, accumulation=4, max_length=2048)
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size) == ("unsloth", 2)
    assert chosen.gradient_accumulation_steps == 4
    fixed_micro = plan(LLAMA_8B, H100, False, "auto", None, per_device=2, accumulation=4, max_length=2048)
    assert (fixed_micro.use_gradient_checkpointing, fixed_micro.per_device_train_batch_size) == (False, 2)


def test_without_a_gpu_auto_takes_the_seeds_choices() -> None:
    assert load_in_4bit("auto", LLAMA_8B, None) is True
    chosen = plan(LLAMA_8B, None, True, "auto", "auto", per_device=2, accumulation=4, max_length=2048)
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size) == ("unsloth", 2)


def test_a_bad_load_in_4bit_is_named() -> None:
    with pytest.raises(ValueError, match="model.load_in_4bit must be true, false or auto"):
        ModelConfig("m", None, 2048, load_in_4bit="yes", dtype=None)


H200 = 143_771 * 2**20  # as torch reports it


def test_micro_batch_tokens_auto_runs_a_step_in_passes_of_the_tokens_that_fit() -> None:
    """`train.micro_batch_tokens: auto`: a step's 16 conversations as one micro-batch, in passes of as many tokens as
    the H200 holds by the per-token estimate (~24,800 on the 8B in 16 bits: one pass for most steps of the data's
    mix, which averages ~23,300 tokens), where `plan` takes 8 x 2 for fear of 16 conversations of 2,048 tokens."""
    chosen, tokens = plan_by_tokens(
        LLAMA_8B, H200, False, "auto", "auto", per_device=8, accumulation=2, max_length=2048
    )
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size) == (False, 16)
    assert chosen.gradient_accumulation_steps == 1
    room = 0.85 * H200 - 1.5 * GIB - weight_bytes(LLAMA_8B, four_bit=False)
    assert tokens == int(room // activation_bytes_per_token(LLAMA_8B, False)) and 24_000 < tokens < 25_500
    assert plan(LLAMA_8B, H200, False, "auto", "auto", 8, 2, 2048).per_device_train_batch_size == 8
    # a card too small for one 2,048-token conversation without checkpointing: checkpointing, and its larger passes
    small, small_tokens = plan_by_tokens(LLAMA_8B, 12 * GIB, True, "auto", "auto", 8, 2, 2048)
    assert small.use_gradient_checkpointing == "unsloth" and small_tokens > 2048


def test_micro_batch_tokens_as_a_number_is_kept_and_must_hold_a_conversation() -> None:
    chosen, tokens = plan_by_tokens(LLAMA_8B, H200, False, "auto", 8192, per_device=2, accumulation=4, max_length=2048)
    assert (chosen.use_gradient_checkpointing, chosen.per_device_train_batch_size, tokens) == (False, 8, 8192)
    without_gpu, tokens = plan_by_tokens(LLAMA_8B, None, True, "auto", "auto", 2, 4, 2048)  # auto: as written, uncut
    assert (without_gpu.per_device_train_batch_size, without_gpu.gradient_accumulation_steps, tokens) == (2, 4, None)
    with pytest.raises(ValueError, match="train.micro_batch_tokens is 1024, below model.max_seq_length 2048"):
        plan_by_tokens(LLAMA_8B, H200, False, "auto", 1024, 2, 4, 2048)
    with pytest.raises(ValueError, match="train.micro_batch_tokens must be null, auto or a number of tokens >= 1"):
        tiny_training(micro_batch_tokens="many")
    with pytest.raises(ValueError, match="train.micro_batch_size and train.micro_batch_tokens both set"):
        tiny_training(micro_batch_size="auto", micro_batch_tokens="auto")
    # evaluation's batches are not cut: as many conversations of max_seq_length as a pass holds
    config = tiny_training(per_device_train_batch_size=16, eval_steps=5)
    assert training_arguments(config, 2048)["per_device_eval_batch_size"] == 16
    cut = tiny_training(per_device_train_batch_size=16, eval_steps=5, micro_batch_tokens=8192)
    assert training_arguments(cut, 2048)["per_device_eval_batch_size"] == 4


@pytest.mark.parametrize(
    ("dtype", "cuda", "bf16_supported", "expected"),
    [
        (None, True, True, (True, False)),  # chosen by the hardware
        (None, True, False, (False, True)),
        ("float16", True, True, (False, True)),  # as set, though the GPU has bf16 (unsloth refuses a mismatch)
        ("bfloat16", True, True, (True, False)),
        ("float32", True, True, (False, False)),  # no flag: unsloth autocasts float32 weights as the GPU allows
        ("float16", False, False, (False, False)),  # the CPU: neither
    ],
)
def test_the_trainers_precision_follows_model_dtype(dtype, cuda: bool, bf16_supported: bool, expected) -> None:
    assert precision_flags(dtype, cuda, bf16_supported) == dict(zip(("bf16", "fp16"), expected, strict=True))


def test_bfloat16_on_a_gpu_without_it_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="model.dtype is bfloat16, which this GPU does not have"):
        precision_flags("bfloat16", cuda=True, bf16_supported=False)
