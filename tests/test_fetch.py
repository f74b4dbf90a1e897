"""fetch: loads local files in the dataset's schema, names bad input, counts every dropped row, holds out rows."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

from finetune.data.cleaning import FetchConfig, check_schema, clean, read_jsonl, split
from finetune.data.sources import resolved_revision
from stages.fetch import load_rows, main

CONFIG = FetchConfig(
    dataset="unused.jsonl",
    revision=None,
    split="train",
    eval_size=2,
    seed=42,
    drop_empty_user=True,
    drop_empty_answer=True,
    drop_duplicates=True,
)


def rows(n: int) -> list[dict[str, str]]:
    return [{"system": "", "user": f"question {i}", "assistant": f"answer {i}"} for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- loading and schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_local_file_by_suffix_with_its_hash(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(rows(5))
    {".jsonl": dataset.to_json, ".csv": dataset.to_csv, ".parquet": dataset.to_parquet}[suffix](str(path))
    loaded, provenance, _ = load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    assert loaded["user"] == [f"question {i}" for i in range(5)]
    assert provenance["source"] == str(path) and len(provenance["sha256"]) == 64


def test_missing_local_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch.dataset: no such file: .*nope.jsonl"):
        load_rows(replace(CONFIG, dataset=str(tmp_path / "nope.jsonl")), (tmp_path,))


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"system": "", "user": "q", "assistant": "a"}\n{"system": "", "user": "\xff", "assistant": "a"}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid UTF-8"):
        read_jsonl(path)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"system": "", "user": "q", "assistant": "a"}\n\n{"system": "", "user": "q",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"system": "", "user": "q", "assistant": "unterminated}')
    with pytest.raises(ValueError, match=r"line 1: not valid JSON \(Unterminated string starting at column 42\)"):
        read_jsonl(path)


def test_a_byte_order_mark_and_crlf_line_ends_read_as_the_content(tmp_path: Path) -> None:
    records = [{"system": "", "user": "q\r\n1", "assistant": "\ufeffa"}, *rows(2)]  # text CR, LF, BOM kept
    plain = write_jsonl(tmp_path / "plain.jsonl", records)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    assert read_jsonl(windows)[0].to_list() == read_jsonl(plain)[0].to_list() == records
    windows.write_bytes(b'\xef\xbb\xbf{"user": 1}\r\n')  # the columns named count from after the mark
    with pytest.raises(ValueError, match=r"line 1: column 'user' holds int 1"):
        read_jsonl(windows)


def test_number_in_a_text_column_names_line_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [rows(1)[0], {"system": "", "user": "q", "assistant": 42}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: column 'assistant' holds int 42, expected text"):
        read_jsonl(path)


def test_numeric_column_in_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    Dataset.from_list([{"system": "", "user": "q", "assistant": 1}]).to_parquet(str(path))
    dataset, _, _ = load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    with pytest.raises(ValueError, match="column 'assistant' must hold text"):
        check_schema(dataset)


def test_unreadable_csv_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('system,user,assistant\n"","q","a"\n"","unterminated\n')
    with pytest.raises(ValueError, match=r"bad.csv: cannot be read as csv"):
        load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))


def test_missing_column_lists_what_was_found() -> None:
    dataset = Dataset.from_list([{"system": "", "question": "q", "assistant": "a"}])
    with pytest.raises(ValueError, match=r"no 'user' column; expected .* found \['system', 'question', 'assistant'\]"):
        check_schema(dataset)


def test_sharegpt_input_is_refused_with_the_reason() -> None:
    dataset = Dataset.from_list([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    with pytest.raises(ValueError, match="already in ShareGPT form"):
        check_schema(dataset)


def test_unknown_extra_columns_are_ignored_and_named() -> None:
    dataset = Dataset.from_list([{**rows(1)[0], "source": "web", "lang": "en"}])
    assert check_schema(dataset) == ["source", "lang"]
    cleaned, _ = clean(dataset, CONFIG)
    assert cleaned.column_names == ["system", "user", "assistant"]


def test_resolved_revision_is_read_from_the_hub_cache_path() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Cached:
        cache_files = [{"filename": f"/c/datasets/org___name/default/0.0.0/{commit}/name-train.arrow"}]

    assert resolved_revision(Cached()) == commit  # type: ignore[arg-type]


# --- cleaning and row accounting ----------------------------------------------------------------------------------


def test_every_row_is_kept_or_counted_by_reason() -> None:
    dataset = Dataset.from_list(
        [
            {"system": "", "user": "q1", "assistant": "a1"},
            {"system": None, "user": "q2", "assistant": "a2"},  # null system: kept as ""
            {"system": "\n", "user": "q3", "assistant": "a3"},  # whitespace system: kept (to_sharegpt blanks it)
            {"system": "", "user": None, "assistant": "a4"},  # null question
            {"system": "", "user": " \u00a0\n", "assistant": "a5"},  # whitespace question (a no-break space too)
            {"system": "", "user": "q6", "assistant": ""},  # empty answer
            {"system": "", "user": "q7", "assistant": None},  # null answer
            {"system": "", "user": "q1", "assistant": "a1"},  # duplicate of the first
        ]
    )
    cleaned, counts = clean(dataset, CONFIG)
    assert cleaned["user"] == ["q1", "q2", "q3"]
    assert cleaned["system"] == ["", "", "\n"]
    assert counts == {
        "rows_in": 8,
        "rows_kept": 3,
        "null_cells_as_empty": 3,
        "dropped_empty_user": 2,
        "dropped_empty_answer": 2,
        "dropped_duplicate": 1,
    }


def test_cleaning_rules_can_be_turned_off() -> None:
    dataset = Dataset.from_list([{"system": "", "user": "", "assistant": ""}] * 2)
    off = replace(CONFIG, drop_empty_user=False, drop_empty_answer=False, drop_duplicates=False)
    cleaned, counts = clean(dataset, off)
    assert len(cleaned) == 2 and counts["rows_kept"] == 2


def test_rows_differing_only_by_a_whitespace_system_are_duplicates() -> None:
    dataset = Dataset.from_list(
        [{"system": system, "user": "q", "assistant": "a"} for system in ("", "\n", " \t", None)]
        + [{"system": "\nA", "user": "q", "assistant": "a"}]
    )
    cleaned, counts = clean(dataset, CONFIG)
    assert cleaned["system"] == ["", "\nA"] and counts["dropped_duplicate"] == 3


def test_duplicates_differing_only_in_system_are_distinct() -> None:
    dataset = Dataset.from_list(
        [{"system": "A", "user": "q", "assistant": "a"}, {"system": "B", "user": "q", "assistant": "a"}]
    )
    assert len(clean(dataset, CONFIG)[0]) == 2


# --- held-out split -----------------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_seeded() -> None:
    dataset = Dataset.from_list(rows(50))
    train, held_out = split(dataset, eval_size=10, seed=42)
    assert len(held_out) == 10 and len(train) == 40
    assert set(train["user"]).isdisjoint(held_out["user"])
    assert set(train["user"]) | set(held_out["user"]) == set(dataset["user"])
    assert split(dataset, eval_size=10, seed=42)[1]["user"] == held_out["user"]
    assert split(dataset, eval_size=10, seed=7)[1]["user"] != held_out["user"]


def test_one_row_dataset_leaves_nothing_to_train_on() -> None:
    with pytest.raises(ValueError, match=r"fetch.eval_size \(2\) must be smaller than the dataset \(1 rows\)"):
        split(Dataset.from_list(rows(1)), eval_size=2, seed=0)


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    dataset, _ = read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="no rows left to train on"):
        split(clean(dataset, CONFIG)[0], eval_size=1, seed=0)


# --- the stage ----------------------------------------------------------------------------------------------------


def test_main_writes_splits_counts_and_provenance(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "rows.jsonl", rows(12) + rows(2) + [{"system": "", "user": "q", "assistant": " "}])
    (tmp_path / "params.yaml").write_text(
        f"fetch: {{dataset: {source}, revision: null, split: train, eval_size: 3, seed: 1,"
        " drop_empty_user: true, drop_empty_answer: true, drop_duplicates: true}\n"
    )
    main(tmp_path / "params.yaml", (tmp_path,), tmp_path / "raw", tmp_path / "fetch.json")
    metrics = json.loads((tmp_path / "fetch.json").read_text())
    assert metrics["rows_in"] == 15 and metrics["rows_kept"] == 12
    assert (metrics["dropped_duplicate"], metrics["dropped_empty_answer"]) == (2, 1)
    assert (metrics["train_rows"], metrics["eval_rows"]) == (9, 3)
    assert metrics["provenance"]["source"] == str(source)
    assert len(Dataset.from_parquet(str(tmp_path / "raw" / "eval.parquet"))) == 3


def test_no_held_out_question_and_answer_is_trained_on_whatever_its_system(tmp_path: Path) -> None:
    # 40 pairs of rows that differ only in their system text, one of each pair said to be from a firm
    records = [
        {"system": system, "user": f"question {i}", "assistant": f"answer {i}"}
        for i in range(40)
        for system in ("", f"Firm {i}")
    ]
    source = write_jsonl(tmp_path / "rows.jsonl", records)
    (tmp_path / "params.yaml").write_text(
        f"fetch: {{dataset: {source}, revision: null, split: train, eval_size: 10, seed: 3,"
        " drop_empty_user: true, drop_empty_answer: true, drop_duplicates: true}\n"
    )
    main(tmp_path / "params.yaml", (tmp_path,), tmp_path / "raw", tmp_path / "fetch.json")
    train = Dataset.from_parquet(str(tmp_path / "raw" / "train.parquet"))
    held_out = Dataset.from_parquet(str(tmp_path / "raw" / "eval.parquet"))
    pairs = {(row["user"], row["assistant"]) for row in held_out}
    assert not pairs & {(row["user"], row["assistant"]) for row in train}
    metrics = json.loads((tmp_path / "fetch.json").read_text())
    assert metrics["dropped_same_as_held_out"] == 80 - len(train) - len(held_out) > 0  # nothing else dropped
    assert metrics["rows_in"] == metrics["train_rows"] + metrics["eval_rows"] + metrics["dropped_same_as_held_out"]


def test_bad_lines_stop_fetch_or_with_drop_are_left_out_counted_by_reason(tmp_path: Path) -> None:
    good = rows(8)
    lines = [json.dumps(row) for row in good[:3]] + ['{"system": "", "user": "q", "assistant": 42}', "not json"]
    lines += [json.dumps(row) for row in good[3:]] + ["[1, 2]", '{"system": "", "user": ["q"], "assistant": "a"}']
    source = tmp_path / "rows.jsonl"
    source.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    settings = (
        f"fetch: {{dataset: {source}, revision: null, split: train, eval_size: 2, seed: 1, drop_empty_user: true,"
        " drop_empty_answer: true, drop_duplicates: true, bad_rows: POLICY}\n"
    )
    (tmp_path / "params.yaml").write_text(settings.replace("POLICY", "error"))
    with pytest.raises(ValueError, match="rows.jsonl line 4: column 'assistant' holds int 42, expected text"):
        main(tmp_path / "params.yaml", (tmp_path,), tmp_path / "raw", tmp_path / "fetch.json")
    (tmp_path / "params.yaml").write_text(settings.replace("POLICY", "drop"))
    main(tmp_path / "params.yaml", (tmp_path,), tmp_path / "raw", tmp_path / "fetch.json")
    metrics = json.loads((tmp_path / "fetch.json").read_text())
    assert (metrics["dropped_non_text_cell"], metrics["dropped_unreadable_line"]) == (2, 3)
    assert metrics["provenance"]["dropped_lines"] == {"non_text_cell": [4, 12], "unreadable_line": [5, 11, 13]}
    assert metrics["rows_in"] == 13 and metrics["train_rows"] + metrics["eval_rows"] == 8  # every line accounted for


def test_a_local_dataset_must_sit_where_dvc_watches_it(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    inside = write_jsonl(tmp_path / "source" / "rows.jsonl", rows(5))
    outside = write_jsonl(tmp_path / "rows.jsonl", rows(5))
    watched = (tmp_path / "sample", tmp_path / "source")
    assert len(load_rows(replace(CONFIG, dataset=str(inside)), watched)[0]) == 5
    with pytest.raises(ValueError, match=r"fetch.dataset: .*rows.jsonl is outside .*sample, .*source, the folders DVC"):
        load_rows(replace(CONFIG, dataset=str(outside)), watched)
