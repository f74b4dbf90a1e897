"""fetch: loads local files in the dataset's schema, names bad columns, holds out disjoint rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from stages.fetch import FetchConfig, check_schema, load, main, split


def config(dataset: str, eval_size: int = 2) -> FetchConfig:
    return FetchConfig(dataset=dataset, revision=None, split="train", eval_size=eval_size, seed=42)


def rows(n: int) -> list[dict[str, str]]:
    return [{"system": "", "user": f"question {i}", "assistant": f"answer {i}"} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_local_file_by_suffix(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(rows(5))
    {".jsonl": dataset.to_json, ".csv": dataset.to_csv, ".parquet": dataset.to_parquet}[suffix](str(path))
    loaded = load(config(str(path)))
    assert loaded["user"] == [f"question {i}" for i in range(5)]


def test_missing_local_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch.dataset: no such file: .*nope.jsonl"):
        load(config(str(tmp_path / "nope.jsonl")))


def test_missing_column_lists_what_was_found() -> None:
    dataset = Dataset.from_list([{"system": "", "question": "q", "assistant": "a"}])
    with pytest.raises(ValueError, match=r"no 'user' column; expected .* found \['system', 'question', 'assistant'\]"):
        check_schema(dataset)


def test_non_text_column_is_named() -> None:
    dataset = Dataset.from_list([{"system": "", "user": "q", "assistant": 3}])
    with pytest.raises(ValueError, match="column 'assistant' must hold text"):
        check_schema(dataset)


def test_split_is_disjoint_complete_and_seeded() -> None:
    dataset = Dataset.from_list(rows(50))
    train, held_out = split(dataset, eval_size=10, seed=42)
    assert len(held_out) == 10 and len(train) == 40
    assert set(train["user"]).isdisjoint(held_out["user"])
    assert set(train["user"]) | set(held_out["user"]) == set(dataset["user"])
    assert split(dataset, eval_size=10, seed=42)[1]["user"] == held_out["user"]
    assert split(dataset, eval_size=10, seed=7)[1]["user"] != held_out["user"]


def test_eval_size_must_leave_training_rows() -> None:
    with pytest.raises(ValueError, match=r"fetch.eval_size \(5\) must be smaller than the dataset \(5 rows\)"):
        split(Dataset.from_list(rows(5)), eval_size=5, seed=0)


def test_main_writes_splits_and_counts(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows(12)))
    (tmp_path / "params.yaml").write_text(
        f"fetch: {{dataset: {source}, revision: null, split: train, eval_size: 3, seed: 1}}\n"
    )
    main(tmp_path / "params.yaml", tmp_path / "raw", tmp_path / "fetch.json")
    assert json.loads((tmp_path / "fetch.json").read_text()) == {"rows": 12, "train_rows": 9, "eval_rows": 3}
    assert len(Dataset.from_parquet(str(tmp_path / "raw" / "eval.parquet"))) == 3
