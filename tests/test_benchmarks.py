"""benchmarks: presets resolve to their Hub settings and label maps, local folders in the presets' schema load
through the Hub's code path, bad entries and rows are named, and the stage writes items flagged for contamination."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from finetune.evaluation.benchmark_sets import PRESETS, BenchmarksConfig, benchmark_rows, label_word, resolve
from stages.benchmarks import load_set, main

KEY = "benchmarks.sets[0]"


def test_presets_resolve_to_the_published_datasets_and_label_maps() -> None:
    fpb, fiqa, tfns = (resolve({"preset": name}, KEY) for name in ("fpb", "fiqa_sa", "tfns"))
    assert (fpb.name, fpb.dataset, fpb.data_dir, fpb.split) == (
        "fpb",
        "takala/financial_phrasebank",
        "sentences_50agree",
        "train",
    )
    assert [label_word(fpb, value, "row", KEY) for value in (0, 1, 2)] == ["negative", "neutral", "positive"]
    assert (tfns.dataset, tfns.split, tfns.text_column) == (
        "zeroshot/twitter-financial-news-sentiment",
        "validation",
        "text",
    )
    # 0 Bearish, 1 Bullish, 2 Neutral
    assert [label_word(tfns, value, "row", KEY) for value in (0, 1, 2)] == ["negative", "positive", "neutral"]
    assert (fiqa.dataset, fiqa.split, fiqa.label_column) == ("TheFinAI/fiqa-sentiment-classification", "test", "score")
    scores = (-0.5, -0.1, 0.0, 0.0999, 0.1, 0.8)  # FinGPT: < -0.1 negative, < 0.1 neutral, else positive
    assert [label_word(fiqa, s, "row", KEY) for s in scores] == ["negative", *["neutral"] * 3, "positive", "positive"]


def test_the_finqa_preset_is_flare_finqa_pinned_a_numeric_benchmark() -> None:
    finqa = resolve({"preset": "finqa"}, KEY)
    assert (finqa.kind, finqa.dataset, finqa.split) == ("numeric", "ChanceFocus/flare-finqa", "test")
    assert (finqa.text_column, finqa.answer_column, finqa.labels) == ("query", "answer", None)
    assert finqa.revision == "4343aee8c5d8d4469b411407f0e3fb3eaeba6bff" and "\\boxed{}" in finqa.instruction
    config = BenchmarksConfig(sets=[{"preset": "finqa"}])
    assert (config.max_new_tokens, config.rel_tolerance) == (1024, 0.01)


def test_a_preset_is_one_line_with_any_field_overridden(root: Path) -> None:
    sets = yaml.safe_load((root / "params.yaml").read_text())["benchmarks"]["sets"]
    assert sets == [{"preset": name} for name in PRESETS]
    bench = resolve({"preset": "tfns", "name": "tweets", "split": "train", "revision": "abc123"}, KEY)
    assert (bench.name, bench.split, bench.revision, bench.text_column) == ("tweets", "train", "abc123", "text")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([{"preset": "fbp"}], r"benchmarks.sets\[0\].preset: unknown preset 'fbp'; known: fpb, fiqa_sa, tfns"),
        ([{"preset": "fpb", "splits": "test"}], r"benchmarks.sets\[0\].splits is not a known key"),
        ([{"preset": "tfns", "label_map": {0: "bearish"}}], r"sets\[0\].label_map maps 0 to 'bearish', not one of"),
        ([{"preset": "fiqa_sa", "cuts": [0.0]}], r"sets\[0\].cuts must hold one fewer value than labels"),
        ([{"preset": "fiqa_sa", "cuts": [0.1, -0.1]}], r"sets\[0\].cuts must increase"),
        ([{"preset": "fiqa_sa", "label_map": {1: "positive"}}], r"sets\[0\]: give label_map or cuts, not both"),
        ([{"preset": "fpb"}, {"preset": "fpb"}], r"benchmarks.sets: names repeat"),
        ([{"preset": "fpb", "name": "f-p-b"}], r"sets\[0\].name must be letters, digits or _"),
        ([{"preset": "fpb", "name": "eval"}], r"sets\[0\].name 'eval' is the first word of evaluate's own metrics"),
        ([{"name": "mine", "dataset": "data/benchmarks/mine.jsonl"}], r"benchmarks.sets\[0\].split is required"),
        (["fpb"], r"benchmarks.sets\[0\] must be a mapping, e.g. \{preset: fpb\}"),
        ([{"preset": "fpb", "kind": "ranked"}], r"sets\[0\].kind must be one of \('labels', 'numeric'\)"),
        ([{"preset": "finqa", "labels": ["up", "down"]}], r"sets\[0\].labels applies to label sets, not to a numeric"),
        ([{"preset": "finqa", "answer_column": None}], r"sets\[0\].answer_column is required for a numeric"),
        ([{"preset": "tfns", "answer_column": "a"}], r"sets\[0\].answer_column applies to numeric benchmarks"),
        ([{"preset": "finqa", "kind": "labels"}], r"sets\[0\].answer_column applies to numeric benchmarks"),
        (
            [{"name": "mine", "dataset": "d.jsonl", "split": "test", "text_column": "q", "instruction": ""}],
            r"sets\[0\].label_column is required for a label set",
        ),
    ],
)
def test_a_bad_entry_is_refused_naming_the_key(sets: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarksConfig(sets=sets)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ngram": 0}, "benchmarks.ngram must be >= 1, got 0"),
        ({"max_new_tokens": 0}, "benchmarks.max_new_tokens must be >= 1, got 0"),
        ({"rel_tolerance": 1.0}, r"benchmarks.rel_tolerance must be >= 0 and < 1, got 1.0"),
        ({"rel_tolerance": -0.01}, r"benchmarks.rel_tolerance must be >= 0 and < 1, got -0.01"),
    ],
)
def test_a_bad_section_setting_is_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarksConfig(sets=[], **settings)


@pytest.mark.parametrize(
    ("preset", "first"),
    [
        ("fpb", {"text": "Quarterly revenue rose 12% on strong loan demand.", "label": "positive"}),
        ("fiqa_sa", {"text": "Barclays shares slide as investment bank revenue disappoints", "label": "negative"}),
        ("tfns", {"text": "$KO - Coca-Cola misses on revenue, shares slip premarket", "label": "negative"}),
    ],
)
def test_the_shipped_stand_ins_load_through_the_hub_code_path(
    root: Path, monkeypatch: pytest.MonkeyPatch, preset: str, first: dict
) -> None:
    """The same `load_dataset(dataset, name, data_dir, split)` call as for the Hub, on a local folder laid out as
    the Hub repository is (FPB: the parquet export's `<config>/train/`)."""
    monkeypatch.chdir(root)
    bench = resolve({"preset": preset, "dataset": f"data/benchmarks/{preset}", "revision": None}, KEY)
    dataset, provenance = load_set(bench, KEY, (Path("data/benchmarks"),))
    rows = benchmark_rows(bench, dataset, KEY)
    files = sorted(path for path in Path(f"data/benchmarks/{preset}").rglob("*") if path.is_file())
    lines = [line for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows[0] == first and len(rows) == len(lines)  # a row of each line of the stand-in's one split
    assert {row["label"] for row in rows} == {"negative", "neutral", "positive"}
    assert provenance == {
        "source": f"data/benchmarks/{preset}",
        "sha256": {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files},
    }


def test_the_finqa_stand_in_loads_through_the_hub_code_path_its_answers_read_as_numbers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root)
    bench = resolve({"preset": "finqa", "dataset": "data/benchmarks/finqa", "revision": None}, KEY)
    dataset, provenance = load_set(bench, KEY, (Path("data/benchmarks"),))
    assert set(dataset.column_names) == {"id", "query", "answer", "text"}  # flare-finqa's columns
    rows = benchmark_rows(bench, dataset, KEY)
    assert rows[0]["answer"] == 0.13636 and rows[0]["text"].startswith(
        "Please answer the given financial question based on the context.\nContext: net revenue was"
    )
    assert rows[0]["text"].endswith("\nAnswer:") and "|net revenue|$ 1,250|$ 1,100|" in rows[0]["text"]
    assert {type(row["answer"]) for row in rows} == {float, str} and {"yes", "no"} <= {row["answer"] for row in rows}
    assert len(rows) == 12 and provenance["source"] == "data/benchmarks/finqa"


def test_a_local_benchmark_must_be_where_dvc_sees_it_and_carry_no_hub_revision(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root)
    fpb = resolve({"preset": "fpb", "dataset": "data/benchmarks/fpb"}, KEY)  # the preset's revision kept
    with pytest.raises(ValueError, match=r"sets\[0\].revision applies to Hub datasets; set it to null"):
        load_set(fpb, KEY, (Path("data/benchmarks"),))
    outside = resolve({"preset": "tfns", "dataset": str(tmp_path)}, KEY)
    with pytest.raises(ValueError, match="is outside data/benchmarks, the folders DVC watches"):
        load_set(outside, KEY, (Path("data/benchmarks"),))
    missing = resolve({"preset": "tfns", "dataset": "data/benchmarks/nowhere"}, KEY)
    with pytest.raises(FileNotFoundError, match=r"sets\[0\].dataset: no such file or folder data/benchmarks/nowhere"):
        load_set(missing, KEY, (Path("data/benchmarks"),))


@pytest.mark.parametrize(
    ("preset", "rows", "message"),
    [
        ("tfns", {"text": ["up", "down"], "label": [1, 3]}, r"row 1: label 3 is not in benchmarks.sets\[0\].label_map"),
        ("tfns", {"tweet": ["up"], "label": [1]}, r"has no column 'text'; it has \['tweet', 'label'\]"),
        ("tfns", {"text": ["up", " "], "label": [1, 0]}, r"row 1: column 'text' holds ' ', expected non-empty text"),
        ("fiqa_sa", {"sentence": ["up"], "score": ["high"]}, r"row 0: label 'high' is no finite number"),
        ("tfns", {"text": [], "label": []}, r"has no rows"),
        ("finqa", {"query": ["Total?", "Up?"], "answer": ["4", "about 3"]}, r"row 1: column 'answer' holds 'about 3'"),
        ("finqa", {"query": ["Total?"], "text": ["Total?"]}, r"has no column 'answer'"),
    ],
)
def test_a_bad_row_is_named(preset: str, rows: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        benchmark_rows(resolve({"preset": preset}, KEY), Dataset.from_dict(rows), KEY)


@pytest.mark.slow  # the stage's worker processes
def test_the_stage_writes_each_benchmark_with_its_contamination_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tweets = [
        ("$ACME beats on revenue and raises its outlook for the full year after strong demand", 1),
        ("$ACME misses", 0),
        ("Fed minutes due at 2 p.m. ET", 2),
        ("Brent crude falls for a third straight session as stockpiles build and demand worries grow again", 0),
    ]
    folder = Path("data/benchmarks/tweets")
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in tweets))
    sums = [("What is 2 + 2?", "4"), ("Fed minutes due at 2 p.m. ET", "1,400"), ("Is 3 more than 2?", "Yes")]
    Path("data/benchmarks/sums").mkdir()
    Path("data/benchmarks/sums/test.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in sums))
    training = [
        [
            {
                "role": "user",
                "content": "Summarise: $acme BEATS on revenue and raises its outlook for the full year after",
            },
            {"role": "assistant", "content": "It did. After strong demand, yes."},
        ],
        [
            {
                "role": "user",
                "content": "Why? crude falls for a third straight session as stockpiles build and demand worries",
            },
            {"role": "assistant", "content": "Fed minutes due at 2 p.m. ET"},
        ],
    ]
    Path("data/standardized").mkdir(parents=True)
    Dataset.from_dict({"conversations": training}).to_parquet("data/standardized/train.parquet")
    entry = {"preset": "tfns", "name": "tweets", "dataset": str(folder)}
    numeric = {"name": "sums", "kind": "numeric", "dataset": "data/benchmarks/sums", "split": "test"}
    numeric |= {"text_column": "q", "answer_column": "a", "instruction": "Reason."}
    settings = {"sets": [entry, numeric], "ngram": 13, "max_new_tokens": 64, "rel_tolerance": 0.02}
    Path("params.yaml").write_text(yaml.safe_dump({"benchmarks": settings}))

    main(Path("params.yaml"), (Path("data/benchmarks"),), Path("data/standardized"), Path("out"), Path("m.json"))

    written = [json.loads(line) for line in Path("out/tweets.jsonl").read_text().splitlines()]
    assert [(row["label"], row["exact"], row["ngram"]) for row in written] == [
        ("positive", False, True),  # its first 13 words are in a question: an n-gram, not whole
        ("negative", False, False),
        ("neutral", True, False),  # a whole answer; shorter than 13 words: exact only
        ("negative", False, True),  # 13 words of it in a question
    ]
    sums = [json.loads(line) for line in Path("out/sums.jsonl").read_text().splitlines()]
    assert [(row["answer"], row["exact"]) for row in sums] == [(4.0, False), (1400.0, True), ("yes", False)]
    manifest = json.loads(Path("out/benchmarks.json").read_text())
    assert manifest["benchmarks"][0]["name"] == "tweets" and manifest["benchmarks"][0]["labels"][0] == "negative"
    assert manifest["benchmarks"][1] | {"provenance": None} == {
        "name": "sums",
        "kind": "numeric",
        "labels": None,
        "instruction": "Reason.",
        "provenance": None,
    }
    assert (manifest["max_new_tokens"], manifest["rel_tolerance"]) == (64, 0.02)
    metrics = json.loads(Path("m.json").read_text())
    assert (metrics["tweets_rows"], metrics["tweets_contaminated"], metrics["tweets_contaminated_share"]) == (
        4,
        3,
        0.75,
    )
    assert (metrics["tweets_contaminated_exact"], metrics["tweets_contaminated_ngram"]) == (1, 2)
    assert metrics["provenance"]["tweets"]["source"] == str(folder) and metrics["training_messages"] == 4
    assert (metrics["sums_rows"], metrics["sums_contaminated_exact"]) == (3, 1)


@pytest.mark.slow  # a stage's process
def test_a_stage_says_a_bad_setting_in_one_line_and_a_traceback_only_when_asked(root: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("benchmarks:\n  sets: [{preset: fpb, name: eval}]\n")
    command = [sys.executable, "-m", "stages.benchmarks", "--params", str(tmp_path / "bad.yaml"), "--sources"]
    command += [str(root / "data/benchmarks"), "--texts", "t", "--out", "o", "--metrics", "m.json"]
    environ = os.environ | {"PYTHONPATH": str(root)}
    brief = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True)
    assert brief.returncode == 1 and brief.stderr.splitlines()[-1] == (
        "benchmarks: error: benchmarks.sets[0].name 'eval' is the first word of evaluate's own metrics (eval, base, "
        "tuned, loss, generated, evaluate, peak): its metrics would overwrite them; choose another name"
    )
    assert "Traceback" not in brief.stderr
    traced = environ | {"FINETUNE_TRACEBACK": "1"}
    full = subprocess.run(command, cwd=tmp_path, env=traced, capture_output=True, text=True)
    assert full.returncode == 1 and "Traceback" in full.stderr and "ValueError: benchmarks.sets[0].name" in full.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_benchmark_may_be_one_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """A set of the user's own, one file in the preset's columns, under a folder DVC watches: read whole, its
    bytes' SHA-256 recorded; a file of another format is named."""
    from datasets import Dataset

    monkeypatch.chdir(tmp_path)
    path = Path("data/benchmarks") / f"tweets{suffix}"
    path.parent.mkdir(parents=True)
    rows = {"text": ["$KO beats estimates", "$XOM cuts guidance"], "label": [1, 0]}
    written = Dataset.from_dict(rows)
    {".jsonl": written.to_json, ".csv": written.to_csv, ".parquet": written.to_parquet}[suffix](str(path))
    bench = resolve({"preset": "tfns", "dataset": str(path), "revision": None}, KEY)
    dataset, provenance = load_set(bench, KEY, (Path("data/benchmarks"),))
    assert benchmark_rows(bench, dataset, KEY) == [
        {"text": "$KO beats estimates", "label": "positive"},
        {"text": "$XOM cuts guidance", "label": "negative"},
    ]
    assert provenance == {"source": str(path), "sha256": {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}}
    other = path.with_suffix(".txt")
    other.write_text("$KO beats estimates\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sets\[0\].dataset: data/benchmarks/tweets.txt must be one of"):
        load_set(
            resolve({"preset": "tfns", "dataset": str(other), "revision": None}, KEY), KEY, (Path("data/benchmarks"),)
        )
