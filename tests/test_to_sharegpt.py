"""to_sharegpt: unsloth's conversion with the seed's merged prompt; whitespace-only system cells count as empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from unsloth.chat_templates import to_sharegpt

from stages.to_sharegpt import (
    ToSharegptConfig,
    blank_whitespace,
    convert,
    prompt_columns,
    whitespace_cells,
    write_extended,
)

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
    write_extended(convert(dataset, CONFIG), extension, random_state, path, rows_per_batch)
    return Dataset.from_parquet(str(path))


def test_merged_prompt_with_system() -> None:
    assert first_turn("Acme has beta 1.2.") == [
        {"from": "human", "value": "What is beta?\nYour input is:\nAcme has beta 1.2."},
        {"from": "gpt", "value": "Market sensitivity."},
    ]


@pytest.mark.parametrize("system", ["", "\n", "  \t\n"])
def test_empty_or_whitespace_system_leaves_the_optional_part_out(system: str) -> None:
    assert first_turn(system)[0] == {"from": "human", "value": "What is beta?"}


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
