"""Token lengths: per-row sums equal the chat template's own count of each merged conversation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from stages import lengths
from stages.chat import Chat, ChatConfig
from stages.to_sharegpt import ToSharegptConfig, convert, extension_orders, measure_lengths, turn_texts

CONFIG = ToSharegptConfig(
    merged_prompt="{user}[[\nYour input is:\n{system}]]",
    output_column_name="assistant",
    conversation_extension=3,
    random_state=3407,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat(tokenizer) -> Chat:
    return Chat(tokenizer, ChatConfig())


def whole_conversation(single: Dataset, orders: list[np.ndarray], i: int) -> list[dict[str, str]]:
    roles = {"human": "user", "gpt": "assistant"}
    return [
        {"role": roles[m["from"]], "content": m["value"]}
        for order in orders
        for m in single[int(order[i])]["conversations"]
    ]


def test_prefix_is_the_bos_token(chat: Chat) -> None:
    assert lengths.prefix_tokens(chat) == 1


def test_lengths_are_those_of_the_trained_token_ids(chat: Chat, sample_rows: list[dict]) -> None:
    conversations = [lengths.messages(row["user"], row["assistant"]) for row in sample_rows[:20]]
    assert lengths.encoded_lengths(chat, conversations).tolist() == [len(chat.encode(c)[0]) for c in conversations]


def test_summed_lengths_equal_each_conversation_rendered_whole(chat: Chat, sample_rows: list[dict]) -> None:
    rows = sample_rows[:60] + [
        {"system": "", "user": "Why?", "assistant": "<think>\nlong reasoning here\n</think>\n\nBecause."},
        {"system": "\n", "user": "Ünïcode — 利率?", "assistant": "  spaced  \n"},
    ]
    single = convert(Dataset.from_list(rows), CONFIG)
    orders = extension_orders(len(single), 3, 3407)
    measured = measure_lengths(chat, single, orders, sample_size=1)  # the check sees one conversation only
    direct = lengths.encoded_lengths(chat, [whole_conversation(single, orders, i) for i in range(len(single))])
    assert measured.tolist() == direct.tolist()
    # the reasoning is trained in its think block (chat.think empty_block), so it is counted
    with_reasoning, without = lengths.row_lengths(
        chat, ["Why?", "<think>\nlong reasoning here\n</think>\n\nBecause.", "Why?", "Because."]
    )
    assert with_reasoning > without


def test_a_template_whose_turns_depend_on_each_other_is_counted_whole(tokenizer, sample_rows: list[dict]) -> None:
    numbered = Chat(
        AutoTokenizer.from_pretrained(tokenizer.name_or_path),
        ChatConfig(
            template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>"
            "{{ 'again ' * loop.index ~ m['content'] }}{% else %}<｜Assistant｜>{{ m['content'] }}"
            "<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        ),
    )
    single = convert(Dataset.from_list(sample_rows[:12]), CONFIG)
    orders = extension_orders(len(single), 3, 3407)
    summed = lengths.conversation_lengths(
        lengths.row_lengths(numbered, turn_texts(single)),
        orders,
        lengths.prefix_tokens(numbered),
    )
    direct = lengths.encoded_lengths(numbered, [whole_conversation(single, orders, i) for i in range(len(single))])
    assert summed.tolist() != direct.tolist()  # the shortcut would be wrong here ...
    assert measure_lengths(numbered, single, orders).tolist() == direct.tolist()  # ... so it is not used


def test_conversation_lengths_keep_one_prefix() -> None:
    rows = np.array([5, 7, 9])
    orders = [np.array([0, 1, 2]), np.array([2, 0, 1])]
    assert lengths.conversation_lengths(rows, orders, prefix=1).tolist() == [13, 11, 15]


def test_summary_reports_percentiles_max_total_and_over_limit() -> None:
    stats = lengths.summary(np.arange(1, 101), limit=90, prefix="train")
    assert stats == {
        "train_tokens_p50": 51,
        "train_tokens_p95": 96,
        "train_tokens_p99": 100,
        "train_tokens_max": 100,
        "train_tokens_total": 5050,
        "train_tokens_over_max_seq_length": 10,
    }
    assert lengths.summary(np.array([], dtype=np.int64), limit=90, prefix="eval") == {
        "eval_tokens_over_max_seq_length": 0
    }


def test_a_tokenizer_without_a_rust_core_counts_the_same(tokenizer) -> None:
    class Slow:  # only what a slow (pure-Python) tokenizer offers: __call__
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict:
            return tokenizer(texts, add_special_tokens=add_special_tokens)

    rendered = [Chat(tokenizer, ChatConfig()).render(lengths.messages("What is beta?", "Market sensitivity."))] * 2
    assert lengths.count_tokens(Slow(), rendered).tolist() == lengths.count_tokens(tokenizer, rendered).tolist()


def test_rows_are_laid_out_once_and_a_template_that_trims_questions_is_rendered_row_by_row(tokenizer) -> None:
    chat = Chat(tokenizer, ChatConfig())
    assert lengths.row_layout(chat) == (
        "<｜begin▁of▁sentence｜><｜User｜>",
        "<｜Assistant｜><think>\n",
        "<｜end▁of▁sentence｜>",
    )
    trimming = Chat(
        AutoTokenizer.from_pretrained(tokenizer.name_or_path),
        ChatConfig(
            template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            "<｜User｜>{{ m['content'] | trim }}{% else %}<｜Assistant｜>{{ m['content'] }}"
            "<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        ),
    )
    assert lengths.row_layout(trimming) is None
    newline_after = Chat(  # like Qwen's: a newline after each end-of-turn
        AutoTokenizer.from_pretrained(tokenizer.name_or_path),
        ChatConfig(
            template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>\n{% endif %}{% endfor %}"
        ),
    )
    assert lengths.row_layout(newline_after) is None
    turns = ["  What is a bond?\n\n", "A loan.", "Duration?", "  Price sensitivity.  "]
    for chat_ in (chat, trimming, newline_after):
        whole = lengths.encoded_lengths(chat_, [lengths.messages(*turns[:2]), lengths.messages(*turns[2:])])
        assert lengths.row_lengths(chat_, turns).tolist() == whole.tolist()
