"""The `benchmarks` section: benchmarks named by a preset (`PRESETS`: Financial PhraseBank, FiQA sentiment,
Twitter Financial News sentiment, with their Hub ids, columns and published label maps; FinQA, with its numeric
answers) whose fields an entry may override, or given field by field; each row's label value mapped to its label
word (a label set), or its reference answer read as a number or yes/no (a numeric benchmark)."""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from datasets import Dataset

from finetune.config import params
from finetune.config.params import require
from finetune.evaluation.numbers import reference

LABELS = ["negative", "neutral", "positive"]
INSTRUCTION = "What is the sentiment of this {kind}? Please choose an answer from {{negative/neutral/positive}}."
# DeepSeek-R1's model card, usage recommendations: no system prompt, and for a problem with a numeric answer
# "Please reason step by step, and put your final answer within \boxed{}." in the user turn
REASONING = "Please reason step by step, and put your final answer within \\boxed{}."
KINDS = ("labels", "numeric")  # a label from a fixed set, scored by likelihood; a generated number, by its value
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
    # FinQA (Chen et al. 2021), numeric reasoning over a report's text and table, as FinBen/PIXIU publish it:
    # ChanceFocus/flare-finqa, parquet, splits train / valid / test, its card's test split the 1,147 questions of
    # FinQA's test set; columns id, query, answer, text. `query` is FLARE's prompt: its instruction line, then
    # "Context:" the text before the table, the table one row a line ("|cell|cell|"), the text after it, then
    # "Question:" the question and "Answer:" (PIXIU data/FinQA/preprocess.py builds it so); `answer` is FinQA's
    # executed answer `exe_ans` as text ("0.26685", "94.0", "yes"); `text` the question alone (unused here). Pinned
    # to 4343aee, the card update that gives the split sizes, the head of its main branch when last listed.
    # ConvFinQA has no preset: its parquet copies (ChanceFocus/flare-convfinqa, AdaptLLM/finance-tasks ConvFinQA)
    # hold as their test split 1,490 turns, ConvFinQA's dev set (dev_turn.json; the published test split holds
    # 1,521), and the later turns carry "{answer0}"-style slots for the model's own earlier answers, which one
    # batched pass cannot fill.
    "finqa": {
        "kind": "numeric",
        "dataset": "ChanceFocus/flare-finqa",
        "revision": "4343aee8c5d8d4469b411407f0e3fb3eaeba6bff",
        "split": "test",
        "text_column": "query",
        "answer_column": "answer",
        "instruction": REASONING,
    },
}


# the first words of evaluate's own metrics (eval_rows, base_loss, tuned_rouge_l, loss_change_pct, ...): a benchmark
# so named would write over them (`<name>_rows`, `<name>_tuned_accuracy`, ...)
RESERVED = ("eval", "base", "tuned", "loss", "generated", "evaluate", "peak")


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str  # prefix of its metrics: <name>_tuned_accuracy, ...
    dataset: str  # Hub dataset id, or a local file or folder under the stage's sources (data/benchmarks/)
    split: str  # the split scored
    text_column: str  # the column of the text classified, or of the question answered (numeric)
    instruction: str  # put before the text in the user turn
    kind: str = "labels"  # labels: one of a fixed set, by likelihood; numeric: a number the model writes
    label_column: str | None = None  # labels: the column of its label value
    labels: list[str] | None = None  # labels: the label words scored, each as the answer
    answer_column: str | None = None  # numeric: the column of its reference answer, a number or yes/no
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
    require(
        bench.name not in RESERVED,
        f"{key}.name {bench.name!r} is the first word of evaluate's own metrics ({', '.join(RESERVED)}): its "
        "metrics would overwrite them; choose another name",
    )
    require(bench.kind in KINDS, f"{key}.kind must be one of {KINDS}, got {bench.kind!r}")
    if bench.kind == "numeric":
        require(bench.answer_column is not None, f"{key}.answer_column is required for a numeric benchmark")
        for field in ("label_column", "labels", "label_map", "cuts"):
            require(getattr(bench, field) is None, f"{key}.{field} applies to label sets, not to a numeric benchmark")
        return bench
    require(bench.answer_column is None, f"{key}.answer_column applies to numeric benchmarks (kind: numeric)")
    for field in ("label_column", "labels"):
        require(getattr(bench, field) is not None, f"{key}.{field} is required for a label set")
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
    max_new_tokens: int = 1024  # numeric benchmarks: longest answer generated, reasoning included, in tokens
    rel_tolerance: float = 0.01  # numeric benchmarks: a number right within this share of the reference's size

    def __post_init__(self) -> None:
        require(self.ngram >= 1, f"benchmarks.ngram must be >= 1, got {self.ngram}")
        require(self.max_new_tokens >= 1, f"benchmarks.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(0 <= self.rel_tolerance < 1, f"benchmarks.rel_tolerance must be >= 0 and < 1, got {self.rel_tolerance}")
        sets = [
            bench if isinstance(bench, BenchmarkConfig) else resolve(bench, f"benchmarks.sets[{i}]")
            for i, bench in enumerate(self.sets)
        ]
        names = [bench.name for bench in sets]
        require(len(set(names)) == len(names), f"benchmarks.sets: names repeat: {names}")
        object.__setattr__(self, "sets", sets)


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


def answer_value(bench: BenchmarkConfig, value: Any, where: str) -> float | str:
    """A numeric benchmark row's reference answer as a number or "yes"/"no" (`numbers.reference`).

    `"1,234.5"` -> 1234.5, `"14.1%"` -> 0.141, `"Yes"` -> "yes"; `"about 3"` stops it, naming the row and column.
    """
    answer = reference(value)
    require(
        answer is not None,
        f"{where}: column {bench.answer_column!r} holds {value!r}, expected a number (thousands separators, $ and %"
        " allowed) or yes/no",
    )
    return answer


def benchmark_rows(bench: BenchmarkConfig, dataset: Dataset, key: str) -> list[dict[str, Any]]:
    """Each row as `{"text", "label"}` with its label word (a label set) or `{"text", "answer"}` with its reference
    answer (a numeric benchmark); a missing column, an empty text, a label value outside the map or an answer that
    is no number stops it, naming the row and column."""
    target = bench.label_column if bench.kind == "labels" else bench.answer_column
    for column in (bench.text_column, target):
        require(
            column in dataset.column_names,
            f"{key}: {bench.dataset} has no column {column!r}; it has {dataset.column_names}",
        )
    rows = []
    for number, (text, value) in enumerate(zip(dataset[bench.text_column], dataset[target], strict=True)):
        where = f"{bench.dataset} ({bench.split}) row {number}"
        require(
            isinstance(text, str) and bool(text.strip()),
            f"{where}: column {bench.text_column!r} holds {text!r}, expected non-empty text",
        )
        if bench.kind == "labels":
            rows.append({"text": text, "label": label_word(bench, value, where, key)})
        else:
            rows.append({"text": text, "answer": answer_value(bench, value, where)})
    require(bool(rows), f"{key}: {bench.dataset} ({bench.split}) has no rows")
    return rows
