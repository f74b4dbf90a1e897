"""fit: `auto` settings from the GPU's memory; the effective batch is always kept."""

from __future__ import annotations

import pytest

from finetune.model.fit import GIB, Shape, activation_bytes_per_token, load_in_4bit, plan, weight_bytes
from finetune.model.load import ModelConfig

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
