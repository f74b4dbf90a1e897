"""chat: one rendering for training, evaluation and generation; every prompt a prefix of what was trained."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from demo.tiny_model import BOS, EOS
from finetune.tokens.chat import IGNORE_INDEX, Chat, ChatConfig, answer_text, split_think, token_ids

TWO_TURNS = [
    {"role": "system", "content": "You are an analyst."},
    {"role": "user", "content": "What is beta?"},
    {"role": "assistant", "content": "Market sensitivity."},
    {"role": "user", "content": "And alpha?"},
    {"role": "assistant", "content": "<think>\nexcess over the benchmark\n</think>\n\nExcess return."},
]


@pytest.fixture
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_golden_two_turn_rendering_with_an_empty_think_block(tokenizer) -> None:
    chat = Chat(tokenizer, ChatConfig(think="empty_block"))
    assert chat.render(TWO_TURNS) == (
        f"{BOS}You are an analyst.<｜User｜>What is beta?<｜Assistant｜><think>\n\n</think>\n\nMarket sensitivity.{EOS}"
        f"<｜User｜>And alpha?<｜Assistant｜><think>\nexcess over the benchmark\n</think>\n\nExcess return.{EOS}"
    )
    assert chat.prompt(TWO_TURNS[:4]) == (
        f"{BOS}You are an analyst.<｜User｜>What is beta?<｜Assistant｜><think>\n\n</think>\n\nMarket sensitivity.{EOS}"
        "<｜User｜>And alpha?<｜Assistant｜><think>\n"
    )


def test_golden_two_turn_rendering_without_think_blocks(tokenizer) -> None:
    chat = Chat(tokenizer, ChatConfig(think="none"))
    assert chat.render(TWO_TURNS) == (
        f"{BOS}You are an analyst.<｜User｜>What is beta?<｜Assistant｜>Market sensitivity.{EOS}"
        f"<｜User｜>And alpha?<｜Assistant｜>Excess return.{EOS}"
    )
    assert chat.prompt(TWO_TURNS[:4]).endswith("<｜User｜>And alpha?<｜Assistant｜>")


def test_a_first_prompt_is_the_published_generation_prompt(tokenizer) -> None:
    chat = Chat(tokenizer, ChatConfig(think="empty_block"))
    published = tokenizer.apply_chat_template(TWO_TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert (
        chat.prompt(TWO_TURNS[:2])
        == published
        == f"{BOS}You are an analyst.<｜User｜>What is beta?<｜Assistant｜><think>\n"
    )


@pytest.mark.parametrize("think", ["empty_block", "none"])
def test_every_prompt_is_a_token_prefix_and_only_answers_are_learnt(tokenizer, think: str) -> None:
    chat = Chat(tokenizer, ChatConfig(think=think))
    ids, labels = chat.encode(TWO_TURNS)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    for turn in (2, 4):
        prompt = chat.prompt_ids(TWO_TURNS[:turn])
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    learnt = tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
    block = "\n</think>\n\n" if think == "empty_block" else ""
    reasoning = "excess over the benchmark" if think == "empty_block" else ""
    assert learnt == f"{block}Market sensitivity.{EOS}{reasoning}{block}Excess return.{EOS}"
    chat.check(padding=True)


def test_token_ids_are_never_cut_by_an_earlier_call_with_truncation(tokenizer) -> None:
    """The tokenizer's Rust core keeps the truncation (and padding) of its last call that asked for it."""
    text = "Net interest margin widened as deposit costs lagged. " * 20
    whole = token_ids(tokenizer, [text])[0]
    tokenizer([text], truncation=True, max_length=5, padding="max_length")  # what a trainer's call may leave behind
    assert len(whole) > 5 and token_ids(tokenizer, [text, "Beta."]) == [whole, token_ids(tokenizer, ["Beta."])[0]]


def test_answer_text_splits_what_the_prompt_gives_from_what_the_model_writes() -> None:
    assert answer_text("Beta.", "empty_block") == ("<think>\n", "\n</think>\n\nBeta.")
    assert answer_text("<think> r </think>  Beta.", "empty_block") == ("<think>\n", "r\n</think>\n\nBeta.")
    assert answer_text("<think>r</think> Beta.", "none") == ("", "Beta.")
    assert answer_text("Beta.", "none") == ("", "Beta.")


def test_one_parser_reads_the_think_block_of_data_and_of_generated_answers() -> None:
    assert split_think("<think>\nLet me see.\n</think>\n\nDuration is 4.2 years.") == (
        "Let me see.",
        "Duration is 4.2 years.",
    )
    assert split_think("Let me see.</think>\n\nDuration is 4.2 years.") == ("Let me see.", "Duration is 4.2 years.")
    assert split_think("  Duration is 4.2 years. ") == ("", "Duration is 4.2 years.")
    assert answer_text("<think>\nLet me see.\n</think>\n\nBeta.", "empty_block")[1] == "Let me see.\n</think>\n\nBeta."


def test_a_template_from_params_replaces_the_tokenizers(tokenizer) -> None:
    plain = "{% for m in messages %}<｜{{ m['role'] }}｜>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    chat = Chat(tokenizer, ChatConfig(template=plain, think="none"))
    assert chat.render(TWO_TURNS[1:3]) == f"<｜user｜>What is beta?{EOS}<｜assistant｜>Market sensitivity.{EOS}"
    assert tokenizer.chat_template == plain  # saved with the adapter, so generation uses it too


@pytest.mark.parametrize(
    ("template", "pad", "message"),
    [
        (
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
            None,
            "does not end an assistant turn with EOS",
        ),
        (
            "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
            None,
            "write BOS twice",
        ),
        ("{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{% endfor %}", None, "did not render"),
        (None, "<｜end▁of▁sentence｜>", "pad token .* must exist and differ from EOS"),
    ],
)
def test_a_template_or_tokenizer_that_breaks_training_is_refused(
    tokenizer, template: str | None, pad: str | None, message: str
) -> None:
    if pad is not None:
        tokenizer.pad_token = pad
    with pytest.raises(ValueError, match=message):
        Chat(tokenizer, ChatConfig(template=template)).check(padding=True)


def test_a_tokenizer_without_a_template_needs_chat_template(tokenizer) -> None:
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template: set chat.template"):
        Chat(tokenizer, ChatConfig())


@pytest.mark.parametrize(("key", "value"), [("think", "maybe"), ("template", " ")])
def test_bad_chat_settings_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"chat.{key} must"):
        ChatConfig(**{key: value})
