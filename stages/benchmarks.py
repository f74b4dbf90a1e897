"""benchmarks: the label-set benchmarks evaluate scores, loaded from the Hub or a local folder, their label values
mapped to the label words, each item checked against the training conversations for contamination.

    python -m stages.benchmarks --sources data/benchmarks --texts data/standardized --out data/benchmark_items \
        --metrics metrics/benchmarks.json

Each entry of `benchmarks.sets` names a preset (`PRESETS`: Financial PhraseBank, FiQA sentiment, Twitter Financial
News sentiment, with their Hub ids, columns and published label maps), any field of which it may override (a local
folder in the same schema as `dataset`, say), or gives every field itself. Written: `<name>.jsonl` per benchmark
(text, label word, and whether the item was found in the training messages whole, `exact`, or by an n-gram,
`ngram`: `stages.contamination`) and `benchmarks.json` (labels, instruction, and where the rows came from: the Hub
commit, or each local file's SHA-256), which evaluate reads. A changed benchmark reruns this stage and evaluate.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

from stages import params, workers
from stages.contamination import Index, contamination, training_messages
from stages.files import BENCHMARK_MANIFEST, file_hash, resolved_revision, write_json
from stages.params import require

log = logging.getLogger("benchmarks")

LABELS = ["negative", "neutral", "positive"]
INSTRUCTION = "What is the sentiment of this {kind}? Please choose an answer from {{negative/neutral/positive}}."
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}

# The published benchmarks, as their Hub cards describe them (each card cited); the instruction is FinGPT's
# (fingpt/FinGPT_Benchmark/benchmarks/*.py), as FinLoRA's results use it.
PRESETS: dict[str, dict[str, Any]] = {
    # Financial PhraseBank (Malo et al. 2014), 4,846 news sentences with >= 50 % annotator agreement. Card of
    # takala/financial_phrasebank: columns sentence, label (ClassLabel 0 negative, 1 neutral, 2 positive), one
    # split, train. Its loading script no longer runs in datasets >= 4; the Hub's parquet export of it (branch
    # refs/convert/parquet, a folder per config, <config>/train/0000.parquet) holds the same rows.
    "fpb": {
        "dataset": "takala/financial_phrasebank",
        "revision": "refs/convert/parquet",
        "data_dir": "sentences_50agree",
        "split": "train",
        "text_column": "sentence",
        "label_column": "label",
        "label_map": {0: "negative", 1: "neutral", 2: "positive"},
        "labels": LABELS,
        "instruction": INSTRUCTION.format(kind="news"),
    },
    # FiQA 2018 task 1 (TheFinAI/fiqa-sentiment-classification, MIT): sentence, score in [-1, 1], splits train
    # 822 / valid 117 / test 234; the score cut as FinGPT's fiqa.py (make_label) cuts it: < -0.1 negative,
    # < 0.1 neutral, else positive
    "fiqa_sa": {
        "dataset": "TheFinAI/fiqa-sentiment-classification",
        "split": "test",
        "text_column": "sentence",
        "label_column": "score",
        "cuts": [-0.1, 0.1],
        "labels": LABELS,
        "instruction": INSTRUCTION.format(kind="news"),
    },
    # Twitter Financial News sentiment (zeroshot/twitter-financial-news-sentiment, MIT): text, label (0 Bearish,
    # 1 Bullish, 2 Neutral); splits train and validation, the validation split (2,388 tweets) the published test set
    "tfns": {
        "dataset": "zeroshot/twitter-financial-news-sentiment",
        "split": "validation",
        "text_column": "text",
        "label_column": "label",
        "label_map": {0: "negative", 1: "positive", 2: "neutral"},
        "labels": LABELS,
        "instruction": INSTRUCTION.format(kind="tweet"),
    },
}


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str  # prefix of its metrics: <name>_tuned_accuracy, ...
    dataset: str  # Hub dataset id, or a local file or folder under the stage's sources (data/benchmarks/)
    split: str  # the split scored
    text_column: str  # the column of the text classified
    label_column: str  # the column of its label value
    labels: list[str]  # the label words scored, each as the answer
    instruction: str  # put before the text in the user turn
    config: str | None = None  # Hub config (load_dataset's name)
    data_dir: str | None = None  # folder of the dataset repository to load
    revision: str | None = None  # Hub commit, tag or branch; null = the default branch (the one got is recorded)
    label_map: dict[str, str] | None = None  # the dataset's label values -> label words
    cuts: list[float] | None = None  # a numeric label cut into len(labels) bins, labels[i] below cuts[i]


def resolve(raw: Any, key: str) -> BenchmarkConfig:
    """One entry of `benchmarks.sets`: a preset with any field overridden, or every field; checked, naming `key`.

    `resolve({"preset": "tfns", "split": "train"}, "benchmarks.sets[0]")` -> tfns's settings on its train split.
    """
    require(isinstance(raw, dict), f"{key} must be a mapping, e.g. {{preset: fpb}}, got {raw!r}")
    fields = dict(raw)
    preset = fields.pop("preset", None)
    if preset is not None:
        require(preset in PRESETS, f"{key}.preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        fields = {"name": preset, **PRESETS[preset], **fields}
    bench = params.build(BenchmarkConfig, fields, key)
    require(bool(re.fullmatch(r"[A-Za-z0-9_]+", bench.name)), f"{key}.name must be letters, digits or _")
    require(len(set(bench.labels)) >= 2, f"{key}.labels must hold at least two distinct labels")
    require(bench.label_map is None or bench.cuts is None, f"{key}: give label_map or cuts, not both")
    label_map = None
    if bench.label_map is not None:
        label_map = {str(value): word for value, word in bench.label_map.items()}
        for value, word in label_map.items():
            require(word in bench.labels, f"{key}.label_map maps {value} to {word!r}, not one of {bench.labels}")
    if bench.cuts is not None:
        require(len(bench.cuts) == len(bench.labels) - 1, f"{key}.cuts must hold one fewer value than labels")
        require(bench.cuts == sorted(set(bench.cuts)), f"{key}.cuts must increase, got {bench.cuts}")
    return BenchmarkConfig(**{**asdict(bench), "label_map": label_map})


@dataclass(frozen=True)
class BenchmarksConfig:
    sets: list[Any]  # the benchmarks, each resolved by `resolve`
    ngram: int = 13  # words of the n-grams compared with the training messages

    def __post_init__(self) -> None:
        require(self.ngram >= 1, f"benchmarks.ngram must be >= 1, got {self.ngram}")
        sets = [
            bench if isinstance(bench, BenchmarkConfig) else resolve(bench, f"benchmarks.sets[{i}]")
            for i, bench in enumerate(self.sets)
        ]
        names = [bench.name for bench in sets]
        require(len(set(names)) == len(names), f"benchmarks.sets: names repeat: {names}")
        object.__setattr__(self, "sets", sets)


def load(bench: BenchmarkConfig, key: str, sources: tuple[Path, ...]) -> tuple[Dataset, dict[str, Any]]:
    """The split of a Hub dataset, or of a local folder or file in the same schema (through the same
    `load_dataset` call), with where it came from: the Hub commit, or each local file's SHA-256."""
    path = Path(bench.dataset)
    if not path.exists() and (bench.dataset.count("/") != 1 or path.suffix.lower() in LOCAL_FORMATS):
        raise FileNotFoundError(f"{key}.dataset: no such file or folder {path}, and no Hub id (owner/name)")
    if not path.exists():
        dataset = load_dataset(
            bench.dataset, name=bench.config, data_dir=bench.data_dir, split=bench.split, revision=bench.revision
        )
        provenance = {"requested_revision": bench.revision, "resolved_revision": resolved_revision(dataset)}
        return dataset, {"source": bench.dataset, **provenance}
    require(
        any(path.resolve().is_relative_to(folder.resolve()) for folder in sources),
        f"{key}.dataset: {path} is outside {', '.join(map(str, sources))}, the folders DVC watches for this stage",
    )
    require(bench.revision is None, f"{key}.revision applies to Hub datasets; set it to null for the local {path}")
    if path.is_file():
        format_ = LOCAL_FORMATS.get(path.suffix.lower())
        require(format_ is not None, f"{key}.dataset: {path} must be one of {', '.join(LOCAL_FORMATS)}")
        dataset = load_dataset(format_, data_files=str(path), split="train")
    else:
        dataset = load_dataset(str(path), name=bench.config, data_dir=bench.data_dir, split=bench.split)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return dataset, {"source": str(path), "sha256": {str(p): file_hash(p, "sha256") for p in files}}


def label_word(bench: BenchmarkConfig, value: Any, where: str, key: str) -> str:
    """The label word of one row's label value: by `cuts`, by `label_map`, or the value itself.

    With tfns's `label_map`, `1` -> `"positive"`; with fiqa_sa's `cuts` [-0.1, 0.1], `-0.1` -> `"neutral"`.
    """
    if bench.cuts is not None:
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        require(number, f"{where}: label {value!r} is no finite number, which {key}.cuts needs")
        return bench.labels[bisect.bisect_right(bench.cuts, value)]
    if bench.label_map is not None:
        require(str(value) in bench.label_map, f"{where}: label {value!r} is not in {key}.label_map {bench.label_map}")
        return bench.label_map[str(value)]
    require(value in bench.labels, f"{where}: label {value!r} is not one of {key}.labels {bench.labels}")
    return value


def items(bench: BenchmarkConfig, dataset: Dataset, key: str) -> list[dict[str, str]]:
    """Each row as `{"text", "label"}` with its label word; a missing column, empty text or unknown label value
    stops it, naming the row and column."""
    for column in (bench.text_column, bench.label_column):
        require(
            column in dataset.column_names,
            f"{key}: {bench.dataset} has no column {column!r}; it has {dataset.column_names}",
        )
    rows = []
    texts, values = dataset[bench.text_column], dataset[bench.label_column]
    for number, (text, value) in enumerate(zip(texts, values, strict=True)):
        where = f"{bench.dataset} ({bench.split}) row {number}"
        require(
            isinstance(text, str) and bool(text.strip()),
            f"{where}: column {bench.text_column!r} holds {text!r}, expected non-empty text",
        )
        rows.append({"text": text, "label": label_word(bench, value, where, key)})
    require(bool(rows), f"{key}: {bench.dataset} ({bench.split}) has no rows")
    return rows


def main(params_path: Path, sources: tuple[Path, ...], texts: Path, out: Path, metrics: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = params.load(BenchmarksConfig, params_path, "benchmarks")
    log.info("config: %s", params.flatten("benchmarks", config))

    # --- load each benchmark and map its labels to the label words
    loaded = []
    for i, bench in enumerate(config.sets):
        dataset, provenance = load(bench, f"benchmarks.sets[{i}]", sources)
        loaded.append((bench, items(bench, dataset, f"benchmarks.sets[{i}]"), provenance))
        log.info("%s: %d rows from %s", bench.name, len(loaded[-1][1]), provenance)

    # --- contamination: every item against every distinct training message
    start = time.perf_counter()
    messages = training_messages(texts / "train.parquet")
    every = [row["text"] for _, rows, _ in loaded for row in rows]
    flags = contamination(Index(every, config.ngram), messages, workers.cores()) if every else {}
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {"training_messages": len(messages), "contamination_seconds": seconds, "provenance": {}}

    # --- outputs: one file per benchmark, the manifest evaluate reads, the metrics
    out.mkdir(parents=True, exist_ok=True)
    manifest, first = [], 0
    for bench, rows, provenance in loaded:
        exact, ngram = flags["exact"][first : first + len(rows)], flags["ngram"][first : first + len(rows)]
        first += len(rows)
        with (out / f"{bench.name}.jsonl").open("w", encoding="utf-8") as f:
            for row, e, n in zip(rows, exact, ngram, strict=True):
                f.write(json.dumps({**row, "exact": bool(e), "ngram": bool(n)}, ensure_ascii=False) + "\n")
        manifest.append(
            {"name": bench.name, "labels": bench.labels, "instruction": bench.instruction, "provenance": provenance}
        )
        contaminated = int((exact | ngram).sum())
        results |= {
            f"{bench.name}_rows": len(rows),
            f"{bench.name}_contaminated_exact": int(exact.sum()),
            f"{bench.name}_contaminated_ngram": int(ngram.sum()),
            f"{bench.name}_contaminated": contaminated,
            f"{bench.name}_contaminated_share": contaminated / len(rows),
        }
        results["provenance"][bench.name] = provenance
    write_json(out / BENCHMARK_MANIFEST, {"benchmarks": manifest, "ngram": config.ngram})
    write_json(metrics, results)
    log.info("%d benchmarks -> %s, metrics -> %s: %s", len(manifest), out, metrics, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sources", type=Path, nargs="+", required=True, help="folders of local benchmark files")
    parser.add_argument("--texts", type=Path, required=True, help="folder of the standardized conversations")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, tuple(args.sources), args.texts, args.out, args.metrics)
