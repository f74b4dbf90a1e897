"""tokenize: the ids and labels of every conversation, once, exactly as the chat template and the cut make them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from datasets import Dataset
from transformers import AutoTokenizer

from finetune.data.files import digests, distinct
from finetune.tokens.chat import IGNORE_INDEX, PROBE, PROBE_FILE, Chat, ChatConfig
from finetune.tokens.encode import TokenizeConfig, encode, summary
from finetune.tokens.shards import SHARD_ROWS
from finetune.training.data import read_tokenized
from stages.tokenize import main

TWO_TURNS = [
    {"role": "system", "content": "You answer questions on corporate finance."},
    {"role": "user", "content": "What is working capital?"},
    {"role": "assistant", "content": "Current assets minus current liabilities."},
    {"role": "user", "content": "And the quick ratio?"},
    {"role": "assistant", "content": "<think>\nliquid only\n</think>\n\nLiquid assets over current liabilities."},
]


@pytest.fixture(scope="module")
def chat(tiny_tokenizer_dir: Path) -> Chat:
    return Chat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), ChatConfig())


def conversations_of(sample_rows: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The sample as the data stages leave it: merged prompts, three one-turn rows per training conversation."""
    turns = [
        [
            {
                "role": "user",
                "content": row["user"] + (f"\nYour input is:\n{row['system']}" if row["system"].strip() else ""),
            },
            {"role": "assistant", "content": row["assistant"]},
        ]
        for row in sample_rows
    ]
    return [turns[i] + turns[(i + 7) % len(turns)] + turns[(i + 13) % len(turns)] for i in range(len(turns))]


def rows_of(table) -> list[dict]:
    return table.to_pylist()


def test_ids_and_labels_are_the_chat_encoding_of_each_conversation(chat: Chat, sample_rows: list[dict]) -> None:
    conversations = conversations_of(sample_rows)[:40] + [TWO_TURNS]
    table, full, counts = encode(chat, conversations, np.arange(41), 4096, TokenizeConfig())
    for row, messages in zip(rows_of(table), conversations, strict=True):
        assert (row["input_ids"], row["labels"]) == chat.encode(messages)
        prompt = chat.prompt_ids(messages[:-1])
        assert row["prompt_length"] == len(prompt) and row["input_ids"][: len(prompt)] == prompt
    assert full.tolist() == [len(chat.encode(m)[0]) for m in conversations]
    assert counts["conversations"] == 41 and counts["cut_over_length"] == counts["dropped_no_answer_token"] == 0


def test_the_layout_fills_in_what_the_template_renders(chat: Chat, sample_rows: list[dict]) -> None:
    for messages in [
        *conversations_of(sample_rows)[:20],
        TWO_TURNS,
        PROBE,
        [{"role": "user", "content": " \n x \n"}, {"role": "assistant", "content": "y"}],
    ]:
        assert chat.fast_pieces(messages) == chat.pieces(messages)


def test_a_template_that_trims_contents_is_rendered_row_by_row(tiny_tokenizer_dir: Path) -> None:
    trims = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] | trim }}"
        "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    chat = Chat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), ChatConfig(template=trims))
    messages = [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "ok"}]
    assert chat.layout(("user", "assistant")) is None
    assert chat.fast_pieces(messages) == chat.pieces(messages)
    assert chat.fast_pieces(messages)[0][0].endswith("<｜User｜>spaced<｜Assistant｜><think>\n")


def test_answers_only_or_every_token(chat: Chat) -> None:
    answers_only, _, _ = encode(chat, [TWO_TURNS], np.arange(1), 4096, TokenizeConfig())
    every, _, _ = encode(chat, [TWO_TURNS], np.arange(1), 4096, TokenizeConfig(train_on_responses_only=False))
    (masked,), (whole,) = rows_of(answers_only), rows_of(every)
    assert whole["labels"] == whole["input_ids"] == masked["input_ids"]
    learnt = [label for label in masked["labels"] if label != IGNORE_INDEX]
    assert learnt.count(chat.tokenizer.eos_token_id) == 2 and len(learnt) < len(masked["labels"])


LONG = [
    {"role": "user", "content": "Explain duration and convexity in detail. " * 40},
    {"role": "assistant", "content": "Duration is the first-order price sensitivity."},
]
LONG_ANSWER = [
    {"role": "user", "content": "Explain duration."},
    {"role": "assistant", "content": "Duration convexity yield. " * 40},
]


@pytest.mark.parametrize("responses_only", [True, False])
@pytest.mark.parametrize("over_length", ["truncate", "drop"])
def test_over_length_conversations_are_cut_or_dropped_and_unlearnable_ones_dropped(
    chat: Chat, over_length: str, responses_only: bool
) -> None:
    """A long question cut before its answer is dropped however the labels fall: with train_on_responses_only false
    its question's tokens would be learnt, and evaluate would score a held-out row with no answer token."""
    short = TWO_TURNS[1:3]  # 24 tokens; LONG 590, its prompt 565; LONG_ANSWER 453, its prompt 8
    conversations = [short, LONG, LONG_ANSWER, short]
    config = TokenizeConfig(over_length=over_length, train_on_responses_only=responses_only)
    table, full, counts = encode(chat, conversations, np.arange(4), 64, config)
    rows = rows_of(table)
    assert (full > 64).tolist() == [False, True, True, False]
    if over_length == "truncate":  # the long answer is cut and kept; the long question leaves no answer token
        assert [row["row"] for row in rows] == [0, 2, 3]
        assert counts.items() >= {"cut_over_length": 1, "dropped_over_length": 0, "dropped_no_answer_token": 1}.items()
        assert len(rows[1]["input_ids"]) == 64 and rows[1]["input_ids"] == chat.encode(LONG_ANSWER)[0][:64]
    else:
        assert [row["row"] for row in rows] == [0, 3]
        assert counts.items() >= {"cut_over_length": 0, "dropped_over_length": 2, "dropped_no_answer_token": 0}.items()
    assert all(any(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    assert counts["conversations_in"] == 4 and counts["tokens"] == sum(len(row["input_ids"]) for row in rows)
    over = summary(full, limit=64)["tokens_over_max_seq_length"]  # each over-length one under one reason
    assert over == 2 == counts["cut_over_length"] + counts["dropped_over_length"] + counts["dropped_no_answer_token"]


def test_summary_reports_percentiles_and_the_count_over_the_limit() -> None:
    assert summary(np.array([10, 20, 30, 40, 100]), limit=35) == {
        "tokens_p50": 30,
        "tokens_p95": 100,
        "tokens_p99": 100,
        "tokens_max": 100,
        "tokens_total": 200,
        "tokens_over_max_seq_length": 2,
    }


def run_stage(
    tmp_path: Path, model_dir: Path, train: list, held_out: list, template: str | None = None, **settings
) -> dict:
    data = tmp_path / "standardized"
    data.mkdir(exist_ok=True)
    for split, conversations in (("train", train), ("eval", held_out)):
        Dataset.from_dict({"conversations": conversations}).to_parquet(data / f"{split}.parquet")
    params = {
        "tokenize": {"train_on_responses_only": True, "over_length": "truncate"} | settings,
        "model": {
            "model_name": str(model_dir),
            "revision": None,
            "max_seq_length": 64,
            "load_in_4bit": True,
            "dtype": None,
        },
        "chat": {"template": template, "think": "empty_block"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    main(tmp_path / "params.yaml", data, tmp_path / "tokenized", tmp_path / "tokenize.json")
    return json.loads((tmp_path / "tokenize.json").read_text())


@pytest.mark.slow  # the stage's worker processes
def test_the_stage_writes_every_split_in_order_whatever_the_shards(
    tmp_path: Path, tiny_tokenizer_dir: Path, chat: Chat, sample_rows: list[dict]
) -> None:
    # three shards, two workers; turns recur within and across shards (first seen in any of them), as merged rows do
    merged = conversations_of(sample_rows)
    train = [LONG if i % 5 == 0 else merged[(7 * i) % len(merged)] for i in range(2 * SHARD_ROWS + 3)]
    train[-1] = [{"role": "user", "content": "Define duration."}, {"role": "assistant", "content": "Rate risk."}]
    counts = run_stage(tmp_path, tiny_tokenizer_dir, train, [TWO_TURNS[1:3], LONG_ANSWER])
    written = Dataset.from_file(str(tmp_path / "tokenized" / "train.arrow"))
    expected, full, expected_counts = encode(chat, train, np.arange(len(train)), 64, TokenizeConfig())
    assert written.data.table.equals(expected)  # what encoding every piece of every conversation makes
    assert written["row"] == [i for i in range(len(train)) if i % 5]
    assert written[-1]["input_ids"] == chat.encode(train[-1])[0]
    assert counts.items() >= {f"train_{key}": value for key, value in expected_counts.items()}.items()
    assert counts["train_dropped_no_answer_token"] == len(train[::5])  # LONG: 64 tokens of question
    assert (
        counts["train_tokens_total"] == full.sum() and counts["train_tokens_over_max_seq_length"] == (full > 64).sum()
    )
    assert counts["eval_conversations"] == 2 and counts["eval_cut_over_length"] == 1
    probe = json.loads((tmp_path / "tokenized" / PROBE_FILE).read_text())
    assert probe["input_ids"] == chat.encode(PROBE)[0]
    assert sorted(p.name for p in (tmp_path / "tokenized").iterdir()) == [PROBE_FILE, "eval.arrow", "train.arrow"]


def test_train_reads_the_first_eval_rows_held_out_rows_and_says_when_there_are_fewer(
    tmp_path: Path, chat: Chat, caplog: pytest.LogCaptureFixture
) -> None:
    table, _, _ = encode(chat, [TWO_TURNS[1:3], TWO_TURNS[1:]], np.arange(2), 64, TokenizeConfig())
    for split in ("train", "eval"):  # written as the stage writes them: an Arrow stream
        with pa.OSFile(str(tmp_path / f"{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
    with caplog.at_level(logging.WARNING, logger="finetune.config.params"):
        train_set, held_out = read_tokenized(tmp_path, 1)
        assert (len(train_set), held_out["input_ids"]) == (2, table["input_ids"].to_pylist()[:1])
        assert caplog.messages == []
        assert read_tokenized(tmp_path, 5)[1]["input_ids"] == table["input_ids"].to_pylist()  # every one there is
    assert caplog.messages == ["train.eval_rows is 5 but only 2 held-out rows were tokenized: scoring 2"]


def test_each_distinct_text_is_numbered_once_in_order_of_first_occurrence() -> None:
    keys = digests(["b", "a", "b", "c", "a"])
    numbers, first = distinct(keys)
    assert numbers.tolist() == [0, 1, 0, 2, 1] and first.tolist() == [0, 1, 3]
    # two digests equal on their first 64 bits only: never one number, whatever their order
    collide = np.array([[5, 1], [5, 2], [5, 1], [4, 9]], np.uint64)
    numbers, first = distinct(collide)
    assert numbers[0] != numbers[1] and numbers[1] != numbers[2] and numbers[0] == numbers[2]
    assert all((collide[first[n]] == collide[i]).all() for i, n in enumerate(numbers))


def test_a_conversation_without_an_answer_is_named(chat: Chat) -> None:
    question_only = [{"role": "user", "content": "What is beta?"}]
    with pytest.raises(ValueError, match="conversation 11: no assistant turn"):
        encode(chat, [TWO_TURNS, question_only], np.array([10, 11]), 4096, TokenizeConfig())


@pytest.mark.slow  # the stage's worker processes
def test_a_split_left_empty_is_refused_naming_the_keys(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"train: every conversation was dropped .*model.max_seq_length"):
        run_stage(tmp_path, tiny_tokenizer_dir, [LONG, LONG_ANSWER], [TWO_TURNS[1:3]], over_length="drop")


def test_a_bad_over_length_policy_is_named() -> None:
    with pytest.raises(ValueError, match="tokenize.over_length must be one of"):
        TokenizeConfig(over_length="cut")


@pytest.mark.slow  # the stage's worker processes
def test_a_template_that_reads_the_contents_is_caught_and_every_conversation_rendered(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    # the layout renders placeholders, so it cannot see that this template writes more for a question ending in "?"
    reads = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
        "{% if m['content'].endswith('?') %} (a question){% endif %}"
        "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    chat = Chat(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), ChatConfig(template=reads))
    train = [TWO_TURNS[1:3], [{"role": "user", "content": "Define beta."}, {"role": "assistant", "content": "Risk."}]]
    assert chat.layout(("user", "assistant")) is not None and chat.fast_pieces(train[0]) != chat.pieces(train[0])
    run_stage(tmp_path, tiny_tokenizer_dir, train, train, template=reads)
    written = Dataset.from_file(str(tmp_path / "tokenized" / "train.arrow"))
    assert [(row["input_ids"], row["labels"]) for row in written] == [chat.encode(m) for m in train]
    assert "(a question)" in chat.tokenizer.decode(written[0]["input_ids"])
