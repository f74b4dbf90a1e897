"""standardize: ShareGPT from/value turns become role/content messages, text unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from unsloth import standardize_sharegpt

from stages.standardize import StandardizeConfig, standardize, standardize_file

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

CONFIG = StandardizeConfig(
    aliases_for_system=["system"],
    aliases_for_user=["user", "human", "input"],
    aliases_for_assistant=["gpt", "assistant", "output"],
)


def test_roles_are_mapped_and_text_kept() -> None:
    conversations = [
        [
            {"from": "human", "value": "What is EBITDA?"},
            {"from": "gpt", "value": "Earnings before interest, taxes, depreciation and amortization."},
            {"from": "human", "value": "And free cash flow?"},
            {"from": "gpt", "value": "Operating cash flow minus capital expenditures."},
        ]
    ]
    result = standardize(Dataset.from_dict({"conversations": conversations}), CONFIG)
    assert result[0]["conversations"] == [
        {"role": "user", "content": "What is EBITDA?"},
        {"role": "assistant", "content": "Earnings before interest, taxes, depreciation and amortization."},
        {"role": "user", "content": "And free cash flow?"},
        {"role": "assistant", "content": "Operating cash flow minus capital expenditures."},
    ]


def test_output_is_unsloths_own(sample_rows: list[dict[str, str]]) -> None:
    conversations = [
        [{"from": "human", "value": row["user"]}, {"from": "gpt", "value": row["assistant"]}]
        for row in sample_rows[:50]
    ]
    dataset = Dataset.from_dict({"conversations": conversations})
    assert standardize(dataset, CONFIG).to_list() == standardize_sharegpt(dataset).to_list()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_standardized_batch_by_batch_is_unsloths_own_on_the_whole(
    sample_rows: list[dict[str, str]], tmp_path: Path, workers: int
) -> None:
    conversations = [
        [{"from": "human", "value": row["user"]}, {"from": "gpt", "value": row["assistant"]}] * (1 + i % 3)
        for i, row in enumerate(sample_rows)
    ]
    dataset = Dataset.from_dict({"conversations": conversations})
    dataset.to_parquet(tmp_path / "sharegpt.parquet")
    written = standardize_file(tmp_path / "sharegpt.parquet", tmp_path / "out.parquet", CONFIG, 7, workers)
    assert written == len(conversations)
    assert Dataset.from_parquet(str(tmp_path / "out.parquet")).to_list() == standardize_sharegpt(dataset).to_list()


def test_a_file_with_no_conversations_is_refused_by_name(tmp_path: Path) -> None:
    empty = pa.table(
        {"conversations": pa.array([], pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))}
    )
    pq.write_table(empty, tmp_path / "eval.parquet")
    with pytest.raises(ValueError, match=r"eval\.parquet: no conversations to standardize"):
        standardize_file(tmp_path / "eval.parquet", tmp_path / "out.parquet", CONFIG)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"aliases_for_user": ["user", "input"]},
            "standardize.aliases_for_user must include 'human', the role to_sharegpt writes; got ['user', 'input']",
        ),
        (
            {"aliases_for_assistant": ["assistant"]},
            "standardize.aliases_for_assistant must include 'gpt', the role to_sharegpt writes; got ['assistant']",
        ),
    ],
)
def test_aliases_without_the_roles_to_sharegpt_writes_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        StandardizeConfig(**{**vars(CONFIG), **change})


def test_aliases_are_matched_as_unsloth_matches_them_case_and_spaces_aside() -> None:
    config = StandardizeConfig(
        aliases_for_system=["system"], aliases_for_user=[" Human"], aliases_for_assistant=["GPT"]
    )
    turns = [{"from": "human", "value": "What is beta?"}, {"from": "gpt", "value": "Market sensitivity."}]
    result = standardize(Dataset.from_dict({"conversations": [turns]}), config)
    assert result[0]["conversations"] == [
        {"role": "user", "content": "What is beta?"},
        {"role": "assistant", "content": "Market sensitivity."},
    ]


def test_each_alias_setting_names_the_roles_it_maps() -> None:
    """A role name becomes the role whose aliases list it: `context` a system turn, or a user turn."""
    turns = [
        {"from": "context", "value": "Figures in USD."},
        {"from": "human", "value": "What is beta?"},
        {"from": "gpt", "value": "Market sensitivity."},
    ]
    roles = {}
    for role in ("system", "user"):
        aliases = [*getattr(CONFIG, f"aliases_for_{role}"), "context"]
        config = StandardizeConfig(**{**vars(CONFIG), f"aliases_for_{role}": aliases})
        result = standardize(Dataset.from_dict({"conversations": [turns]}), config)
        roles[role] = [turn["role"] for turn in result[0]["conversations"]]
    assert roles == {"system": ["system", "user", "assistant"], "user": ["user", "user", "assistant"]}
