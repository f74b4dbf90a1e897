"""Local stand-ins of the finance benchmarks, in their Hub schema, for the speed scripts (`perf.evaluate_speed`):
generated texts of each set's size and length, its label values or FinQA-like numeric answers, written where the
benchmarks stage loads a local folder."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from finetune.evaluation.benchmark_sets import BenchmarkConfig
from perf.data_stages import text

# the sizes of the splits the presets score: FPB sentences_50agree; FiQA-SA test (of 822 train, 117 valid, 234 test);
# TFNS validation; FinQA test
REAL_ITEMS = {"fpb": 4846, "fiqa_sa": 234, "tfns": 2388, "finqa": 1147}
ITEM_CHARS = {"fpb": 125, "fiqa_sa": 85, "tfns": 85}  # mean characters of an item: news sentences, headlines, tweets
# a FinQA question's mean characters of text before and after its table (a word of perf.data_stages.WORDS is ~8
# characters and a token or so of the real tokenizer), and the table's rows: FinQA's report excerpts, under 700 words
# on average, ~1,000 tokens a prompt. The shape's tokenizer (the demo's, trained on the sample) splits words finer:
# the texts are scaled to FINQA_TOKENS of it (`finqa_scale`), so that the model reads and keeps what it would
FINQA_CHARS = (3600, 2800)
FINQA_TABLE_ROWS = 6
FINQA_TOKENS = 1000


def label_values(bench: BenchmarkConfig) -> list[Any]:
    """Values of `bench`'s label column as its dataset holds them: the keys of its label map (numbers as numbers,
    as the Hub's ClassLabel columns hold them), scores spread over its cuts, or the label words themselves.

    tfns -> `[0, 1, 2]`; fiqa_sa (cuts -0.1, 0.1) -> `[-0.6, 0.0, 0.6]`, scores in [-1, 1] as its own.
    """
    if bench.label_map is not None:
        return [int(value) if value.lstrip("-").isdigit() else value for value in bench.label_map]
    if bench.cuts is not None:  # a value inside each bin: below the first cut, between cuts, above the last
        bounds = [bench.cuts[0] - 1, *bench.cuts, bench.cuts[-1] + 1]
        return [round((a + b) / 2, 4) for a, b in zip(bounds, bounds[1:], strict=False)]
    return list(bench.labels)


def finqa_question(rng: random.Random, scale: float = 1.0) -> str:
    """A generated question in FLARE's FinQA layout: its instruction line, the context's text, a table a row a line
    (`|cell|cell|`), more text, the question; each text of half to one and a half times its mean length
    (`FINQA_CHARS` x `scale`)."""
    before, after = (text(rng, rng.randint(int(c * scale) // 2, 3 * int(c * scale) // 2)) for c in FINQA_CHARS)
    cells = [[text(rng, 12)] + [f"{rng.uniform(0, 9999):,.1f}" for _ in range(3)] for _ in range(FINQA_TABLE_ROWS)]
    table = "\n".join("|" + "|".join(row) + "|" for row in [["", "2019", "2018", "2017"], *cells])
    context = f"Please answer the given financial question based on the context.\nContext: {before}\n{table}\n{after}"
    return f"{context}\nQuestion: what was the change in {text(rng, 40)} from 2018 to 2019?\nAnswer:"


def finqa_scale(tokenizer: Any) -> float:
    """How much longer or shorter than `FINQA_CHARS` a question's texts are written for `tokenizer` to read a prompt
    of ~`FINQA_TOKENS` tokens in them: the texts' tokens and the rest's (table, question), measured on 16 questions."""

    def mean_tokens(scale: float) -> float:
        rng = random.Random(0)
        return sum(len(tokenizer(finqa_question(rng, scale))["input_ids"]) for _ in range(16)) / 16

    fixed = mean_tokens(0.0)
    return (FINQA_TOKENS - fixed) / (mean_tokens(1.0) - fixed)


def stand_in(bench: BenchmarkConfig, folder: Path, items: int, seed: int, scale: float = 1.0) -> Path:
    """Write `items` rows of generated text in `bench`'s schema where the benchmarks stage loads a local folder in
    the Hub's layout, `<folder>/<data_dir>/<split>.jsonl`: its text and label columns with its label values (a label
    set), or its question and answer columns, FinQA-like questions (`finqa_question`, `scale`) and numbers or yes/no
    (numeric)."""
    rng = random.Random(seed)
    values = label_values(bench) if bench.kind == "labels" else []
    mean = ITEM_CHARS.get(bench.name, 100)
    path = folder / (bench.data_dir or "") / f"{bench.split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(items):
            if bench.kind == "labels":
                row = {bench.text_column: text(rng, rng.randint(mean // 2, 3 * mean // 2))}
                row[str(bench.label_column)] = rng.choice(values)
            else:  # FinQA's answers: numbers as text, a few of its comparison questions' yes and no
                answer = rng.choice(["yes", "no"]) if rng.random() < 0.02 else f"{rng.uniform(-500, 500):.5f}"
                row = {bench.text_column: finqa_question(rng, scale), str(bench.answer_column): answer}
            f.write(json.dumps(row) + "\n")
    return path


def benchmark_items(value: str, name: str) -> int:
    """`--benchmark-items` for the set `name`: `real` (its published size, `REAL_ITEMS`) or a number of items."""
    if value != "real":
        return int(value)
    if name not in REAL_ITEMS:
        raise ValueError(f"--benchmark-items real: no real size known for {name!r} (known: {', '.join(REAL_ITEMS)})")
    return REAL_ITEMS[name]
