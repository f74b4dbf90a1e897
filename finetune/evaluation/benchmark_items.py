"""The benchmarks stage's files as evaluate reads them, each checked: `benchmarks.json` (every benchmark's kind,
labels, instruction and provenance, in the order of `benchmarks.sets`; the numeric benchmarks' generation length
and tolerance) and `<name>.jsonl`, an item a line: `{"text", "label", "exact", "ngram"}` for a label set,
`{"text", "answer", "exact", "ngram"}` for a numeric benchmark. And what both kinds do alike: the user turn that
asks an item, the rows found in the training messages and the clean rest."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.files import BENCHMARK_MANIFEST


@dataclass(frozen=True)
class Benchmark:
    name: str  # prefix of its metrics: <name>_base_accuracy, ...
    instruction: str  # put before the text in the user turn
    rows: list[dict[str, Any]]  # {"text", "label" or "answer", "exact", "ngram"}
    provenance: dict[str, Any]  # where the rows came from: Hub id and commit, or local files and their SHA-256
    kind: str = "labels"  # labels: each answer scored as one of `labels`; numeric: a number the model writes
    labels: list[str] | None = None  # a label set's fixed labels
    max_new_tokens: int = 1024  # numeric: longest answer generated, reasoning included
    rel_tolerance: float = 0.01  # numeric: a number is right within this share of the reference's size


def target(row: Any, kind: str, labels: list[str] | None) -> str | None:
    """What is wrong with a row's label (a label set) or reference answer (numeric), or None if nothing."""
    if kind == "labels":
        return None if row.get("label") in (labels or []) else f"label {row.get('label')!r} is not one of {labels}"
    answer = row.get("answer")
    number = isinstance(answer, int | float) and not isinstance(answer, bool) and math.isfinite(answer)
    return None if number or answer in ("yes", "no") else f'"answer" {answer!r} is no finite number nor yes/no'


def read_rows(path: Path, kind: str = "labels", labels: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one benchmark file, each checked: a JSON object with a text, a label of the fixed set (a label
    set) or a reference answer (numeric), and the two contamination flags."""
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark file {path}: run the benchmarks stage (dvc repro benchmarks)")
    key = "label" if kind == "labels" else "answer"
    rows = []
    # "\n" alone ends a line: the stage writes U+2028, U+2029 and U+0085 unescaped, and splitlines() splits on them
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON at column {error.colno} ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f'{where}: expected an object with a non-empty "text" string, got {line[:80]!r}')
        problem = target(row, kind, labels)
        if problem:
            raise ValueError(f"{where}: {problem}")
        if not all(isinstance(row.get(flag), bool) for flag in ("exact", "ngram")):
            raise ValueError(f'{where}: expected "exact" and "ngram" flags, true or false')
        rows.append({name: row[name] for name in ("text", key, "exact", "ngram")})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_benchmarks(folder: Path) -> list[Benchmark]:
    """The benchmarks of the benchmarks stage's folder, in the order of `benchmarks.sets`."""
    manifest = json.loads((folder / BENCHMARK_MANIFEST).read_text(encoding="utf-8"))
    out = []
    for entry in manifest["benchmarks"]:
        kind, labels = entry.get("kind", "labels"), entry.get("labels")
        generation = {key: manifest[key] for key in ("max_new_tokens", "rel_tolerance")} if kind == "numeric" else {}
        rows = read_rows(folder / f"{entry['name']}.jsonl", kind, labels)
        out.append(
            Benchmark(entry["name"], entry["instruction"], rows, entry["provenance"], kind, labels, **generation)
        )
    return out


def question(bench: Benchmark, text: str) -> str:
    """The user turn that asks one item: the instruction, a blank line, the item's text."""
    return f"{bench.instruction}\n\n{text}" if bench.instruction else text


def check_fits(bench: Benchmark, number: int, what: str, tokens: int, max_length: int) -> None:
    """Stop at row `number` (from 1) of `bench` if its `tokens` pass `max_length`: the model would read it cut.
    `what` names them with their verb ("its prompt takes")."""
    if tokens > max_length:
        raise ValueError(
            f"{bench.name} row {number}: {what} {tokens} tokens, more than model.max_seq_length {max_length}: "
            "shorten the text or raise model.max_seq_length"
        )


def clean_rows(bench: Benchmark) -> list[int]:
    """The indices of the rows found in the training messages neither whole nor by an n-gram."""
    return [i for i, row in enumerate(bench.rows) if not (row["exact"] or row["ngram"])]


def contamination_counts(bench: Benchmark) -> dict[str, float | int]:
    """`{"<name>_rows", "<name>_contaminated_rows", "<name>_contaminated_share", "<name>_clean_rows"}`."""
    rows, clean = len(bench.rows), len(clean_rows(bench))
    n = bench.name
    return {
        f"{n}_rows": rows,
        f"{n}_contaminated_rows": rows - clean,
        f"{n}_contaminated_share": (rows - clean) / rows,
        f"{n}_clean_rows": clean,
    }
