"""What evaluate reads of the benchmarks stage's files: the benchmarks in the stage's order with their provenance and
generation settings, every bad line named by its number, a missing file named with what to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from examples import CLEAN, SENTIMENT

from finetune.evaluation.benchmark_items import read_benchmarks, read_rows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            f'{{"text": "Shares rose.", "label": "positive", {CLEAN}}}\n'
            f'{{"text": "Shares fell.", "label": "bearish", {CLEAN}}}\n',
            r":2: label 'bearish' is not one of \['negative', 'neutral', 'positive'\]",
        ),
        (
            f'{{"text": "Shares rose.", "label": "positive", {CLEAN}}}\n{{"text": "Shares fell.",\n',
            r":2: not valid JSON at column 25 \(Expecting property name enclosed in double quotes\)$",
        ),
        (f'{{"label": "positive", {CLEAN}}}\n', r':1: expected an object with a non-empty "text" string'),
        (f'{{"text": "  ", "label": "positive", {CLEAN}}}\n', r':1: expected an object with a non-empty "text" string'),
        ('["Shares rose.", "positive"]\n', r":1: expected an object"),
        ('{"text": "Shares rose.", "label": "positive"}\n', r':1: expected "exact" and "ngram" flags'),
        ("\n\n", r": no rows"),
    ],
)
def test_a_bad_benchmark_file_is_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bench.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_rows(path, "labels", SENTIMENT.labels)


def test_an_item_with_a_unicode_line_separator_reads_back_as_the_stage_wrote_it(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped; str.splitlines() splits on them
    rows = [
        {"text": "Revenue rose.\u2028Costs fell.", "label": "positive", "exact": False, "ngram": False},
        {"text": "Margins\u0085held\u2029flat.", "label": "neutral", "exact": True, "ngram": False},
    ]
    with (tmp_path / "bench.jsonl").open("w", encoding="utf-8") as f:  # as stages/benchmarks.py writes its items
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    assert "\u2028" in (tmp_path / "bench.jsonl").read_text(encoding="utf-8")  # unescaped, as the stage leaves it
    assert read_rows(tmp_path / "bench.jsonl", "labels", SENTIMENT.labels) == rows


def test_a_missing_benchmark_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no benchmark file .*nowhere.jsonl: run the benchmarks stage"):
        read_rows(tmp_path / "nowhere.jsonl", "labels", SENTIMENT.labels)


def test_the_benchmarks_are_read_in_the_stage_order_with_their_provenance(tmp_path: Path) -> None:
    manifest = {"benchmarks": [{**vars(SENTIMENT), "name": name} for name in ("tfns", "fpb")], "ngram": 13}
    for entry in manifest["benchmarks"]:
        del entry["rows"]
        (tmp_path / f"{entry['name']}.jsonl").write_text(f'{{"text": "Shares rose.", "label": "positive", {CLEAN}}}\n')
    (tmp_path / "benchmarks.json").write_text(json.dumps(manifest))
    tfns, fpb = read_benchmarks(tmp_path)
    assert (tfns.name, fpb.name) == ("tfns", "fpb") and fpb.provenance == SENTIMENT.provenance
    assert fpb.rows == [{"text": "Shares rose.", "label": "positive", "exact": False, "ngram": False}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            f'{{"text": "Total?", "answer": 4.0, {CLEAN}}}\n{{"text": "Up?", "answer": "maybe", {CLEAN}}}\n',
            r":2: \"answer\" 'maybe' is no finite number nor yes/no",
        ),
        (f'{{"text": "Total?", "answer": "4.0", {CLEAN}}}\n', r":1: \"answer\" '4.0' is no finite number"),
        (f'{{"text": "Total?", "answer": true, {CLEAN}}}\n', r":1: \"answer\" True is no finite number nor yes/no"),
        (f'{{"text": "Total?", "label": "positive", {CLEAN}}}\n', r":1: \"answer\" None"),
    ],
)
def test_a_bad_numeric_benchmark_file_is_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "finqa.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_rows(path, "numeric")


def test_numeric_benchmarks_are_read_with_the_generation_settings_of_the_stage(tmp_path: Path) -> None:
    entry = {"name": "finqa", "kind": "numeric", "labels": None, "instruction": "Reason.", "provenance": {}}
    manifest = {"benchmarks": [entry], "ngram": 13, "max_new_tokens": 48, "rel_tolerance": 0.005}
    (tmp_path / "benchmarks.json").write_text(json.dumps(manifest))
    (tmp_path / "finqa.jsonl").write_text(f'{{"text": "Up?", "answer": "yes", {CLEAN}}}\n')
    (bench,) = read_benchmarks(tmp_path)
    assert (bench.kind, bench.max_new_tokens, bench.rel_tolerance, bench.labels) == ("numeric", 48, 0.005, None)
    assert bench.rows == [{"text": "Up?", "answer": "yes", "exact": False, "ngram": False}]
