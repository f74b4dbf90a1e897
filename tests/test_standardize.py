"""standardize: ShareGPT from/value turns become role/content messages, text unchanged."""

from __future__ import annotations

from datasets import Dataset
from unsloth import standardize_sharegpt

from stages.standardize import StandardizeConfig, standardize

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
