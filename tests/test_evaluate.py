"""evaluate: answer-only scoring that padding never touches, prompts cut where the template starts the answer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from demo.tiny_model import BOS, EOS
from stages.evaluate import IGNORE_INDEX, batch_nll, encode, generate, prompt_and_answer, score
from stages.model import ModelConfig, load_base

MESSAGES = [
    {"role": "user", "content": "What is a basis point?"},
    {"role": "assistant", "content": "One hundredth of a percentage point."},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=256, load_in_4bit=True, dtype=None
    )
    model, tokenizer = load_base(config)
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    return model, tokenizer


def test_prompt_ends_where_the_template_starts_the_answer(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    prompt, answer = prompt_and_answer(tokenizer, MESSAGES)
    assert prompt == f"{BOS}<｜User｜>What is a basis point?<｜Assistant｜>"
    assert answer == f"One hundredth of a percentage point.{EOS}"


def test_conversation_must_end_with_an_answer(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        prompt_and_answer(tokenizer, MESSAGES[:1])


def test_encode_masks_the_prompt_and_keeps_the_answer(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    prompt, answer = prompt_and_answer(tokenizer, MESSAGES)
    ids, labels = encode(tokenizer, prompt, answer, max_length=256)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    short_ids, short_labels = encode(tokenizer, prompt, answer, max_length=n_prompt + 2)
    assert len(short_ids) == len(short_labels) == n_prompt + 2


def test_padding_never_enters_the_loss(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    rows = [
        encode(
            tokenizer,
            *prompt_and_answer(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
            256,
        )
        for q, a in [("Hi", "Hello."), ("What is EBITDA, in one long sentence?", "Earnings before interest and taxes.")]
    ]
    alone = [batch_nll(model, [row], tokenizer.pad_token_id) for row in rows]
    together = batch_nll(model, rows, tokenizer.pad_token_id)
    assert together[1] == sum(count for _, count in alone)
    assert together[0] == pytest.approx(sum(nll for nll, _ in alone), rel=1e-4)
    scored = score(model, rows, tokenizer.pad_token_id, batch_size=1)
    assert scored["tokens"] == together[1]
    assert scored["perplexity"] == pytest.approx(math.exp(together[0] / together[1]), rel=1e-4)


def test_disabling_the_adapter_changes_the_score(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    rows = [encode(tokenizer, *prompt_and_answer(tokenizer, MESSAGES), 256)]
    with model.disable_adapter():
        base = score(model, rows, tokenizer.pad_token_id, batch_size=1)
    tuned = score(model, rows, tokenizer.pad_token_id, batch_size=1)
    assert base["tokens"] == tuned["tokens"] and base["loss"] != tuned["loss"]


def test_generate_answers_each_prompt_greedily(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [prompt_and_answer(tokenizer, MESSAGES)[0], f"{BOS}<｜User｜>Define beta.<｜Assistant｜>"]
    first = generate(model, tokenizer, prompts, max_new_tokens=5)
    assert len(first) == 2 and all(isinstance(text, str) for text in first)
    assert generate(model, tokenizer, prompts, max_new_tokens=5) == first
