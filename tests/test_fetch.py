"""fetch: loads local files in the dataset's schema, names bad input, counts every dropped row, holds out rows."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Features, Value

from finetune.data.cleaning import FetchConfig, check_schema, clean, clean_and_split, draw, read_jsonl
from finetune.data.files import digests
from finetune.data.near_copies import normalised, row_keys, sharing_answers, text_digests
from finetune.data.sources import from_file, resolved_revision
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


def cleaned(dataset: Dataset, config: FetchConfig = CONFIG) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The rows `clean` keeps, as records, and its counts."""
    table, kept, counts, _ = clean(dataset, config)
    return table.take(kept).to_pylist(), counts


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- loading and schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_local_file_by_suffix_with_its_hash(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(rows(5))
    {".jsonl": dataset.to_json, ".csv": dataset.to_csv, ".parquet": dataset.to_parquet}[suffix](str(path))
    loaded, provenance, _, _ = load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    assert loaded["user"] == [f"question {i}" for i in range(5)]
    assert provenance == {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


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


def test_a_number_in_a_text_column_of_parquet_or_json_is_named_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    Dataset.from_list([{"system": "", "user": "q", "assistant": 1}]).to_parquet(str(path))
    message = r"column 'assistant' must hold text, found Value\('int64'\): row 0 holds int 1$"
    with pytest.raises(ValueError, match=message):
        load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    path = tmp_path / "data.json"  # one JSON array: a column of mixed cells
    path.write_text(json.dumps([*rows(2), {"system": "", "user": "q", "assistant": 5}]))
    with pytest.raises(ValueError, match=r"column 'assistant' must hold text, found .*: row 2 holds int 5$"):
        load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))


def test_a_csv_keeps_answers_that_pandas_would_read_as_missing_and_reads_every_column_as_text(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("system,user,assistant\n,Any dividend?,None\n,Its rating?,N/A\n,Year?,2024\n,,null\n,NA,nan\n")
    dataset, _, _, ignored = load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    assert ignored == [] and dataset.features == Features({c: Value("string") for c in ("system", "user", "assistant")})
    assert dataset.to_list() == [  # an empty cell alone is missing: the system column's, and one question
        {"system": None, "user": "Any dividend?", "assistant": "None"},
        {"system": None, "user": "Its rating?", "assistant": "N/A"},
        {"system": None, "user": "Year?", "assistant": "2024"},
        {"system": None, "user": None, "assistant": "null"},
        {"system": None, "user": "NA", "assistant": "nan"},
    ]
    path.write_bytes(b"system,user,assistant\n,ok,fine\n,caf\xe9,x\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"data.csv line 3: not valid UTF-8 \(invalid continuation byte at byte 4\)"):
        load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))


def test_other_keys_of_a_jsonl_file_are_named_not_read_whatever_they_hold(tmp_path: Path) -> None:
    records = [{**rows(2)[0], "source": "web", "tags": {"a": 1}}, {**rows(2)[1], "source": 3, "tags": [1]}]
    path = write_jsonl(tmp_path / "rows.jsonl", records)
    dataset, _, _, ignored = load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))
    assert ignored == ["source", "tags"] and dataset.to_list() == rows(2)
    write_jsonl(path, [{"system": "", "question": "q", "assistant": "a"}])  # the schema's user under another name
    with pytest.raises(ValueError, match=r"no 'user' column; expected .* found \['system', 'assistant', 'question'\]"):
        load_rows(replace(CONFIG, dataset=str(path)), (tmp_path,))


def test_a_lone_surrogate_is_named_or_with_drop_counted(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + '\n{"system": "", "user": "q \\ud800 x", "assistant": "a"}\n')
    message = r"rows.jsonl line 2: column 'user' holds a lone surrogate '\\ud800' at character 2, not valid Unicode"
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)
    dataset, dropped, _ = read_jsonl(path, "drop")
    assert dataset.to_list() == rows(1) and dropped == {"unreadable_line": [], "non_text_cell": [2]}


def test_a_local_folder_or_a_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rows").mkdir()
    with pytest.raises(ValueError, match=r"fetch.dataset: .*rows is a local folder; give a .parquet, .jsonl, .json"):
        load_rows(replace(CONFIG, dataset=str(tmp_path / "rows")), (tmp_path,))
    (tmp_path / "rows.tsv").write_text("system\tuser\tassistant\n")
    with pytest.raises(ValueError, match=r"fetch.dataset: .*rows.tsv is a local file; give a .parquet"):
        load_rows(replace(CONFIG, dataset=str(tmp_path / "rows.tsv")), (tmp_path,))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_replaced_with_its_time_kept_is_read_anew(tmp_path: Path, suffix: str) -> None:
    """datasets' cache knows a local file by its path and modification time: cp -p or rsync -a of new rows gave the
    old ones, beside the new file's SHA-256."""
    path = tmp_path / f"rows{suffix}"
    for answer in ("Old answer.", "New answer."):
        rows = Dataset.from_list([{"system": "", "user": "Why?", "assistant": answer}])
        if suffix == ".csv":
            rows.to_csv(path, index=False)
        else:
            rows.to_parquet(path)
        os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)  # the same time both times
        assert from_file(path)["assistant"] == [answer]


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
    assert list(cleaned(dataset)[0][0]) == ["system", "user", "assistant"]


def test_resolved_revision_is_read_from_the_hub_cache_path(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    path = tmp_path / f"datasets/org___name/default/0.0.0/{commit}/name-train.arrow"  # as the Hub's cache lays it out
    path.parent.mkdir(parents=True)
    table = pa.Table.from_pylist(rows(2))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    cached = Dataset.from_file(str(path))
    assert cached["user"] == ["question 0", "question 1"]
    assert resolved_revision(cached) == commit
    assert resolved_revision(Dataset.from_list(rows(2))) is None  # in memory: no cache file, no commit


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
    kept, counts = cleaned(dataset)
    assert [row["user"] for row in kept] == ["q1", "q2", "q3"]
    assert [row["system"] for row in kept] == ["", "", "\n"]
    assert counts == {
        "rows_in": 8,
        "rows_kept": 3,
        "null_cells_as_empty": 3,
        "dropped_empty_user": 2,
        "dropped_empty_answer": 2,
        "dropped_duplicate": 1,
        "dropped_near_duplicate": 0,
    }


def test_cleaning_rules_can_be_turned_off() -> None:
    dataset = Dataset.from_list([{"system": "", "user": "", "assistant": ""}] * 2)
    off = replace(CONFIG, drop_empty_user=False, drop_empty_answer=False, drop_duplicates=False)
    kept, counts = cleaned(dataset, off)
    assert len(kept) == 2 and counts["rows_kept"] == 2


def test_rows_differing_only_by_a_whitespace_system_are_duplicates() -> None:
    dataset = Dataset.from_list(
        [{"system": system, "user": "q", "assistant": "a"} for system in ("", "\n", " \t", None)]
        + [{"system": "\nA", "user": "q", "assistant": "a"}]
    )
    kept, counts = cleaned(dataset)
    assert [row["system"] for row in kept] == ["", "\nA"] and counts["dropped_duplicate"] == 3


def test_duplicates_differing_only_in_system_are_distinct() -> None:
    dataset = Dataset.from_list(
        [{"system": "A", "user": "q", "assistant": "a"}, {"system": "B", "user": "q", "assistant": "a"}]
    )
    assert len(cleaned(dataset)[0]) == 2


def test_texts_are_compared_normalised_and_digested_without_a_normalised_copy() -> None:
    assert normalised("\tThe \ufb01rm\u00a0 grew\r\n by  5%. ") == "The firm grew by 5%."
    assert normalised("a\u200bb") == "a\u200bb"  # a zero-width space is no whitespace: kept
    spaces = [chr(c) for c in range(0x3001) if chr(c).isspace()]  # every whitespace character there is
    assert len(spaces) == 29 and all(normalised(f"a{c}b") == "a b" for c in spaces)
    texts = ["plain text", " lead", "trail ", "two  spaces", "tab\there", "caf\u00e9", "", None, "a\u2003b", *spaces]
    chunked = pa.chunked_array([pa.array(texts[:5]), pa.array(texts[5:])])
    expected = digests([normalised(text or "") for text in texts])
    assert (text_digests(chunked) == expected).all()
    assert (text_digests(pa.array(texts, pa.large_string()).slice(3, 6)) == expected[3:9]).all()


def test_a_row_holding_a_run_of_a_held_out_answer_is_dropped_or_counted() -> None:
    # in each group an answer, a row that holds 13 of its words (in its question for odd groups) and one that holds
    # 12; which are held out depends on the draw, so what is dropped is checked against a plain search
    def answer(k: int) -> list[str]:
        return [f"g{k}w{j}" for j in range(20)]

    records = []
    for k in range(8):
        thirteen = f"Note: {' '.join(answer(k)[3:16]).upper()}, as said."  # case and punctuation aside
        records.append({"system": "", "user": f"question {k}", "assistant": " ".join(answer(k))})
        question, reply = (thirteen, f"see above {k}") if k % 2 else (f"why {k}", thirteen)
        records.append({"system": "", "user": question, "assistant": reply})
        records.append({"system": "", "user": f"how {k}", "assistant": "so " + " ".join(answer(k)[3:15])})
    config = replace(CONFIG, eval_size=6, seed=1, drop_held_out_ngram=False)
    table, train, held_out, counts = clean_and_split(Dataset.from_list(records), config, {})
    counted, held_out = table.take(train).to_pylist(), table.take(held_out).to_pylist()

    def runs(text: str, n: int = 13) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    held_out_runs = [runs(row["assistant"]) for row in held_out]
    sharing = [row for row in counted if any(runs(row["user"] + " | " + row["assistant"]) & r for r in held_out_runs)]
    copied = [r for r in held_out_runs if any(runs(row["user"] + " | " + row["assistant"]) & r for row in counted)]
    assert counts["train_rows_sharing_held_out_ngram"] == len(sharing) > 0
    assert counts["held_out_rows_with_near_copies"] == len(copied) and counts["dropped_held_out_ngram"] == 0
    table, dropped, held_out_again, counts = clean_and_split(
        Dataset.from_list(records), replace(config, drop_held_out_ngram=True), {}
    )
    assert table.take(held_out_again).to_pylist() == held_out
    assert table.take(dropped).to_pylist() == [row for row in counted if row not in sharing]
    assert counts["dropped_held_out_ngram"] == counts["train_rows_sharing_held_out_ngram"] == len(sharing)
    assert counts["rows_in"] == len(dropped) + len(held_out) + len(sharing)


def test_keys_and_search_depend_on_neither_batch_nor_processes() -> None:
    answer = " ".join(f"word{j}" for j in range(15))
    replies = [f"a\u00a0{i} " + (answer if i % 7 == 3 else "") for i in range(40)]
    table = pa.table({"system": [""] * 40, "user": [f"q {i}" for i in range(40)], "assistant": replies})
    searched = np.arange(40) % 5 != 0  # rows 0, 5, ... are not searched
    keys = row_keys(table, processes=1)
    holding, found = sharing_answers(table, searched, [answer, "short"], 13, processes=1)
    assert holding.tolist() == [i % 7 == 3 and i % 5 != 0 for i in range(40)] and found.tolist() == [True, False]
    for processes, batch in ((2, 7), (1, 1)):
        assert (row_keys(table, processes, batch) == keys).all()
        other = sharing_answers(table, searched, [answer, "short"], 13, processes, batch)
        assert (other[0] == holding).all() and (other[1] == found).all()


def test_a_negative_seed_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="^fetch.seed must be >= 0, got -1$"):
        replace(CONFIG, seed=-1)


def test_a_held_out_ngram_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="fetch.held_out_ngram must be >= 1, got 0"):
        replace(CONFIG, held_out_ngram=0)


# --- held-out split -----------------------------------------------------------------------------------------------


def test_the_draw_is_disjoint_complete_seeded_and_that_of_datasets() -> None:
    train, held_out = draw(50, eval_size=10, seed=42)
    assert len(held_out) == 10 and sorted([*train, *held_out]) == list(range(50))
    assert draw(50, eval_size=10, seed=42)[1].tolist() == held_out.tolist()
    assert draw(50, eval_size=10, seed=7)[1].tolist() != held_out.tolist()
    parts = Dataset.from_list(rows(50)).train_test_split(test_size=10, seed=42)  # the draw of earlier versions
    assert [f"question {i}" for i in held_out] == parts["test"]["user"]
    assert [f"question {i}" for i in train] == parts["train"]["user"]


def test_one_row_dataset_leaves_nothing_to_train_on() -> None:
    with pytest.raises(ValueError, match=r"fetch.eval_size \(2\) must be smaller than the dataset \(1 rows\)"):
        draw(1, eval_size=2, seed=0)


def test_no_rows_left_is_refused_with_every_rows_fate(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    dataset, none_left_out, _ = read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="^fetch: no rows left of 0 to train on: none dropped$"):
        clean_and_split(dataset, CONFIG, none_left_out)
    blank = Dataset.from_list(
        [{"system": "", "user": "q", "assistant": " "}, {"system": "", "user": "", "assistant": "a"}]
    )
    fates = "dropped_empty_user 1, dropped_empty_answer 1, dropped_unreadable_line 1"
    message = f"^fetch: no rows left of 3 to train on: {fates}$"
    with pytest.raises(ValueError, match=message):
        clean_and_split(blank, CONFIG, {"unreadable_line": [7], "non_text_cell": []})
    # three rows of one question and answer: one held out, the others its copies, dropped
    same = Dataset.from_list([{"system": s, "user": "q", "assistant": "a"} for s in ("", "You are brief.", "Be kind.")])
    message = "^fetch: no training rows left of 3, 1 held out: dropped_same_as_held_out 2$"
    with pytest.raises(ValueError, match=message):
        clean_and_split(same, replace(CONFIG, eval_size=1), {})


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


def test_no_held_out_question_and_answer_is_trained_on_whatever_its_system_or_whitespace(tmp_path: Path) -> None:
    # 40 questions each written six ways, as scraped data repeats them: a space or a newline at the end, a doubled
    # space, and twice said to be from a firm, with a tab or a no-break space in that system text
    def ways(i: int) -> list[tuple[str, str, str]]:
        question, answer = f"What did firm {i} report?", f"Revenue of {i} million."
        return [
            ("", question, answer),
            ("", question + " ", answer),
            ("", question, answer + "\n"),
            ("", question.replace(" ", "  ", 1), answer),
            (f"Firm\t{i}", question, answer),
            (f"Firm\u00a0{i}", question + "\n", answer),
        ]

    records = [dict(zip(("system", "user", "assistant"), way, strict=True)) for i in range(40) for way in ways(i)]
    source = write_jsonl(tmp_path / "rows.jsonl", records)
    (tmp_path / "params.yaml").write_text(
        f"fetch: {{dataset: {source}, revision: null, split: train, eval_size: 10, seed: 3,"
        " drop_empty_user: true, drop_empty_answer: true, drop_duplicates: true}\n"
    )
    main(tmp_path / "params.yaml", (tmp_path,), tmp_path / "raw", tmp_path / "fetch.json")
    train = Dataset.from_parquet(str(tmp_path / "raw" / "train.parquet"))
    held_out = Dataset.from_parquet(str(tmp_path / "raw" / "eval.parquet"))

    def questions(rows: Dataset) -> set[str]:
        return {" ".join(row["user"].split()) for row in rows}

    assert not questions(held_out) & questions(train)
    metrics = json.loads((tmp_path / "fetch.json").read_text())
    # each question's rows are two once normalised, with and without the firm: 4 of its 6 near-duplicates
    assert (metrics["dropped_near_duplicate"], metrics["dropped_duplicate"]) == (160, 0)
    assert metrics["dropped_same_as_held_out"] == 80 - len(train) - len(held_out) > 0
    assert metrics["held_out_rows_with_near_copies"] == metrics["dropped_same_as_held_out"]  # one copy each
    assert {row["user"] for row in train} <= {way[1] for i in range(40) for way in ways(i)}  # texts as they came
    assert metrics["rows_in"] == 240 == len(train) + len(held_out) + 160 + metrics["dropped_same_as_held_out"]


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
