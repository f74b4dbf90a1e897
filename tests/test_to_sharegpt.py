"""to_sharegpt: unsloth's conversion with the seed's merged prompt; whitespace-only system cells count as empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from datasets import Dataset, concatenate_datasets
from unsloth.chat_templates import to_sharegpt

from finetune.data.conversion import (
    ToSharegptConfig,
    blank_whitespace,
    convert,
    held_out_copies,
    prompt_columns,
    user_turn,
)
from finetune.data.sharegpt import extension_orders, write_extended
from stages.to_sharegpt import main, whitespace_cells

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

CONFIG = ToSharegptConfig(
    merged_prompt="{user}[[\nYour input is:\n{system}]]",
    output_column_name="assistant",
    conversation_extension=3,
    random_state=3407,
)


def first_turn(system: str) -> list[dict[str, str]]:
    dataset = Dataset.from_list([{"system": system, "user": "What is beta?", "assistant": "Market sensitivity."}])
    return convert(dataset, CONFIG)[0]["conversations"]


def extended(dataset: Dataset, extension: int, random_state: int, path: Path, rows_per_batch: int = 7) -> Dataset:
    single = convert(dataset, CONFIG)
    orders = extension_orders(len(single), extension, random_state)
    write_extended(single.data.column("conversations"), orders, path, rows_per_batch)
    return Dataset.from_parquet(str(path))


def test_merged_prompt_with_system() -> None:
    assert first_turn("Acme has beta 1.2.") == [
        {"from": "human", "value": "What is beta?\nYour input is:\nAcme has beta 1.2."},
        {"from": "gpt", "value": "Market sensitivity."},
    ]


@pytest.mark.parametrize("system", ["", "\n", "  \t\n"])
def test_empty_or_whitespace_system_leaves_the_optional_part_out(system: str) -> None:
    assert first_turn(system)[0] == {"from": "human", "value": "What is beta?"}


def test_a_question_asked_later_gets_the_user_turn_its_row_would_have_had() -> None:
    """tools.generate asks through the same merge: a system text where the training rows had theirs."""
    assert user_turn("What is beta?", "Acme has beta 1.2.", CONFIG) == first_turn("Acme has beta 1.2.")[0]["value"]
    assert user_turn("What is beta?", None, CONFIG) == "What is beta?" == user_turn("What is beta?", " \n", CONFIG)
    bare = ToSharegptConfig(**{**vars(CONFIG), "merged_prompt": "Question: {user}"})
    assert user_turn("What is beta?", None, bare) == "Question: What is beta?"
    with pytest.raises(ValueError, match=r"to_sharegpt.merged_prompt 'Question: \{user\}' has no \{system\}"):
        user_turn("What is beta?", "Be brief.", bare)


def test_extension_merges_three_rows_per_training_conversation(
    sample_rows: list[dict[str, str]], tmp_path: Path
) -> None:
    dataset = Dataset.from_list(sample_rows[:30])
    converted = extended(dataset, 3, 3407, tmp_path / "train.parquet")
    assert len(converted) == 30
    assert all(len(row["conversations"]) == 6 for row in converted)
    assert [turn["from"] for turn in converted[0]["conversations"]] == ["human", "gpt"] * 3
    single = extended(dataset, 1, 3407, tmp_path / "eval.parquet")
    assert single.to_list() == convert(dataset, CONFIG).to_list()


def test_rows_held_in_several_chunks_give_what_one_chunk_gives(
    sample_rows: list[dict[str, str]], tmp_path: Path
) -> None:
    # a dataset file holds its rows in record batches: the extension and the texts must read across them
    parts = [convert(Dataset.from_list(sample_rows[i : i + 9]), CONFIG) for i in range(0, len(sample_rows), 9)]
    chunked = concatenate_datasets(parts)
    assert chunked.data.column("conversations").num_chunks > 1
    whole = Dataset.from_list(chunked.to_list())
    assert whole.data.column("conversations").num_chunks == 1
    orders = extension_orders(len(whole), 3, 3407)
    write_extended(chunked.data.column("conversations"), orders, tmp_path / "chunked.parquet", rows_per_batch=5)
    write_extended(whole.data.column("conversations"), orders, tmp_path / "whole.parquet", rows_per_batch=1000)
    written = Dataset.from_parquet(str(tmp_path / "chunked.parquet")).to_list()
    assert written == Dataset.from_parquet(str(tmp_path / "whole.parquet")).to_list()
    assert len(written) == len(whole)
    assert written[1]["conversations"][:2] == whole[1]["conversations"]


@pytest.mark.parametrize(("extension", "random_state", "rows_per_batch"), [(3, 3407, 7), (2, 1, 1000), (4, 42, 64)])
def test_output_is_unsloths_own_on_blanked_input(
    sample_rows: list[dict[str, str]], tmp_path: Path, extension: int, random_state: int, rows_per_batch: int
) -> None:
    dataset = Dataset.from_list(sample_rows)
    ours = extended(dataset, extension, random_state, tmp_path / "train.parquet", rows_per_batch)
    theirs = to_sharegpt(
        blank_whitespace(dataset, ["user", "system"]),
        merged_prompt=CONFIG.merged_prompt,
        output_column_name="assistant",
        conversation_extension=extension,
        random_state=random_state,
    )
    assert ours.to_list() == theirs.to_list()


def test_blank_whitespace_touches_only_whitespace_cells() -> None:
    dataset = Dataset.from_list([{"system": "\n", "user": " q "}, {"system": "ctx", "user": "\t"}])
    assert blank_whitespace(dataset, ["system", "user"]).to_list() == [
        {"system": "", "user": " q "},
        {"system": "ctx", "user": ""},
    ]


def test_prompt_columns() -> None:
    assert prompt_columns("{user}[[\nYour input is:\n{system}]]") == ["user", "system"]
    assert prompt_columns('{{"as": "json"}} {user}{user} {the system}') == ["user", "the system"]  # as unsloth reads


def test_a_negative_random_state_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^to_sharegpt\.random_state must be >= 0, got -1$"):
        ToSharegptConfig(**{**vars(CONFIG), "random_state": -1})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"merged_prompt": "{question}"}, "to_sharegpt.merged_prompt names {question}, not a column of {raw}"),
        (
            {"merged_prompt": "{user}[[\nContext: {context}]]"},
            "to_sharegpt.merged_prompt names {context}, not a column of {raw}",
        ),
        ({"output_column_name": "answer"}, "to_sharegpt.output_column_name names answer, not a column of {raw}"),
        (
            {"merged_prompt": "{system}"},
            "to_sharegpt.merged_prompt must hold {user}, each row's question, outside any [[...]] part; got '{system}'",
        ),
        (
            {"merged_prompt": "[[{system}\n{user}]]"},
            "to_sharegpt.merged_prompt must hold {user}, each row's question, outside any [[...]] part; "
            "got '[[{system}\\n{user}]]'",
        ),
    ],
)
def test_a_prompt_or_answer_column_the_rows_lack_is_refused_before_any_output(
    tmp_path: Path, sample_rows: list[dict[str, str]], setting: dict, message: str
) -> None:
    (tmp_path / "raw").mkdir()
    for split in ("train", "eval"):
        Dataset.from_list(sample_rows[:4]).to_parquet(tmp_path / "raw" / f"{split}.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"to_sharegpt": vars(CONFIG) | setting}), encoding="utf-8")
    raw = f"{tmp_path / 'raw' / 'train.parquet'} (system, user, assistant)"
    with pytest.raises(ValueError, match=f"^{re.escape(message.replace('{raw}', raw))}$"):
        main(tmp_path / "params.yaml", tmp_path / "raw", tmp_path / "out", tmp_path / "metrics.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()


def test_prompt_without_columns_is_refused() -> None:
    with pytest.raises(ValueError, match=r"to_sharegpt.merged_prompt must name a \{column\}"):
        ToSharegptConfig(
            merged_prompt="no columns", output_column_name="assistant", conversation_extension=1, random_state=0
        )


def test_whitespace_cells_counts_what_blanking_empties() -> None:
    dataset = Dataset.from_dict({"system": ["\n", "", " a", "\t ", None], "user": ["q", "  ", "x", "y", "z"]})
    blanked = blank_whitespace(dataset, ["system", "user"])
    changed = sum(a != b for c in ("system", "user") for a, b in zip(dataset[c], blanked[c], strict=True))
    assert whitespace_cells(dataset, ["system", "user"]) == changed == 3


def test_the_stage_counts_every_row_and_reads_no_model(tmp_path: Path, sample_rows: list[dict[str, str]]) -> None:
    (tmp_path / "raw").mkdir()
    Dataset.from_list(sample_rows[:12]).to_parquet(tmp_path / "raw" / "train.parquet")
    Dataset.from_list(sample_rows[12:16]).to_parquet(tmp_path / "raw" / "eval.parquet")
    settings = {"merged_prompt": CONFIG.merged_prompt, "output_column_name": "assistant"}
    params = {"to_sharegpt": settings | {"conversation_extension": 3, "random_state": 3407}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")  # no model or chat section
    main(tmp_path / "params.yaml", tmp_path / "raw", tmp_path / "out", tmp_path / "metrics.json")
    counts = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    blanked = sum(row["system"] != "" and not row["system"].strip() for row in sample_rows[:12])
    assert counts == {
        "train_rows_in": 12,
        "train_conversations": 12,
        "train_whitespace_cells_blanked": blanked,
        "train_dropped_same_as_held_out": 0,
        "eval_rows_in": 4,
        "eval_conversations": 4,
        "eval_whitespace_cells_blanked": sum(
            row["system"] != "" and not row["system"].strip() for row in sample_rows[12:16]
        ),
    }
    train = Dataset.from_parquet(str(tmp_path / "out" / "train.parquet"))
    held_out = Dataset.from_parquet(str(tmp_path / "out" / "eval.parquet"))
    assert [len(row["conversations"]) for row in train] == [6] * 12
    assert [len(row["conversations"]) for row in held_out] == [2] * 4  # held-out rows stay single-turn


def test_a_training_row_the_merge_renders_as_a_held_out_row_is_dropped_and_counted(tmp_path: Path) -> None:
    """fetch compares the raw columns: a training row whose question already holds a held-out row's question and
    system text, joined as the merged prompt joins them, with the same answer, passed it and trained on the held-out
    conversation. Only the rendered conversation shows it; a row with another answer, or a question the merge does
    not render so, stays."""
    held_out = {"system": "Be brief.", "user": "What is beta?", "assistant": "Market sensitivity."}
    merged_question = "What is beta?\nYour input is:\nBe brief."
    train = [
        {"system": "", "user": merged_question, "assistant": "Market sensitivity."},  # the held-out conversation
        {"system": "  ", "user": merged_question, "assistant": "Market sensitivity."},  # whitespace: blanked, same
        {"system": "", "user": merged_question, "assistant": "Sensitivity to the market."},  # another answer
        {"system": "", "user": "What is beta?", "assistant": "Market sensitivity."},  # another question turn
        {"system": "", "user": "What is alpha?", "assistant": "Excess return."},
    ]
    (tmp_path / "raw").mkdir()
    Dataset.from_list(train).to_parquet(tmp_path / "raw" / "train.parquet")
    Dataset.from_list([held_out]).to_parquet(tmp_path / "raw" / "eval.parquet")
    params = {"to_sharegpt": {**vars(CONFIG), "conversation_extension": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    main(tmp_path / "params.yaml", tmp_path / "raw", tmp_path / "out", tmp_path / "metrics.json")
    counts = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert counts["train_rows_in"] == 5 and counts["train_dropped_same_as_held_out"] == 2
    assert counts["train_conversations"] == 3
    kept = Dataset.from_parquet(str(tmp_path / "out" / "train.parquet"))["conversations"]
    assert [(c[0]["value"], c[1]["value"]) for c in kept] == [
        (merged_question, "Sensitivity to the market."),
        ("What is beta?", "Market sensitivity."),
        ("What is alpha?", "Excess return."),
    ]
    (evaluated,) = Dataset.from_parquet(str(tmp_path / "out" / "eval.parquet"))["conversations"]
    assert evaluated == [{"from": "human", "value": merged_question}, {"from": "gpt", "value": "Market sensitivity."}]


def test_held_out_copies_are_found_in_every_chunk_a_sliced_one_too() -> None:
    def conversation(question: str, answer: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    rows = [conversation(f"Q{i}?", "A." if i % 3 else "B.") for i in range(9)]
    column = pa.array(rows)
    chunks = pa.chunked_array([column.slice(0, 4), column.slice(4, 5)])  # the second chunk starts at an offset
    held_out = pa.chunked_array([pa.array([conversation("Q3?", "B."), conversation("Q5?", "B."), rows[7]])])
    assert held_out_copies(chunks, held_out).tolist() == [i in (3, 7) for i in range(9)]  # Q5? has another answer
