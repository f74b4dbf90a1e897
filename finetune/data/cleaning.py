"""The `fetch` section and its rules: rows of the dataset's schema read and checked, cleaned with every dropped row
counted by reason, the held-out rows drawn, and no held-out question and answer left in training.

Every row's fate is counted: `rows_in = rows_kept + sum(dropped_*)`. Exact duplicates (a whitespace-only system
counting as empty, as to_sharegpt renders it) are dropped before the held-out draw; a training row with the
question and answer of a held-out row, whatever its system text, is dropped too (`same_as_held_out`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Value

from finetune.config.params import require
from finetune.data.files import ROWS_PER_GROUP, digests, distinct

TEXT_COLUMNS = ("system", "user", "assistant")
BAD_LINE_REASONS = ("unreadable_line", "non_text_cell")  # why a .jsonl line is left out (`fetch.bad_rows: drop`)
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark many Windows tools write first: a marker, not text


@dataclass(frozen=True)
class FetchConfig:
    dataset: str  # Hub dataset id, or a local .parquet/.jsonl/.json/.csv file in the same schema
    revision: str | None  # Hub commit, tag or branch; null = the default branch
    split: str  # Hub split to load
    eval_size: int  # rows held out for evaluation
    seed: int  # seed of the held-out draw
    drop_empty_user: bool  # drop rows whose question is null, empty or whitespace
    drop_empty_answer: bool  # drop rows whose answer is null, empty or whitespace
    drop_duplicates: bool  # drop exact repeats of (system, user, assistant), keeping the first
    bad_rows: str = "error"  # a .jsonl line that is no JSON object of text cells: error (named) or drop (counted)

    def __post_init__(self) -> None:
        require(bool(self.dataset.strip()), "fetch.dataset must not be empty")
        require(self.bad_rows in ("error", "drop"), f"fetch.bad_rows must be error or drop, got {self.bad_rows!r}")
        require(self.eval_size >= 1, f"fetch.eval_size must be >= 1, got {self.eval_size}")


def bad_line(path: Path, number: int, raw: bytes) -> tuple[str | None, Any]:
    """A JSON-lines line read: `(None, row)`, or `(reason, message)` for a line that is no JSON object of text cells
    (`unreadable_line`: not UTF-8, not JSON, not an object; `non_text_cell`: a number, list ... in a text column)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return "unreadable_line", f"{path} line {number}: not valid UTF-8 ({error.reason} at byte {error.start})"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        message = error.msg.removesuffix(" at")  # "Unterminated string starting at"
        return "unreadable_line", f"{path} line {number}: not valid JSON ({message} at column {error.colno})"
    if not isinstance(row, dict):
        return "unreadable_line", f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
    for column in TEXT_COLUMNS:
        cell = row.get(column)
        if cell is not None and not isinstance(cell, str):
            return "non_text_cell", (
                f"{path} line {number}: column '{column}' holds {type(cell).__name__} {cell!r}, expected text"
            )
    return None, row


def read_jsonl(path: Path, bad_rows: str = "error") -> tuple[Dataset, dict[str, list[int]]]:
    """Read a JSON-lines file; a bad line (`bad_line`) stops it naming the line, or with `bad_rows: drop` is left
    out. Returns the rows and the numbers of the lines left out, by reason. A byte-order mark at the start of the
    file is skipped; a CRLF line end is whitespace after the line's JSON, so it reads as an LF one."""
    rows, dropped = [], {reason: [] for reason in BAD_LINE_REASONS}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            reason, read = bad_line(path, number, raw)
            if reason is None:
                rows.append(read)
            elif bad_rows == "drop":
                dropped[reason].append(number)
            else:
                raise ValueError(f"{read} (fetch.bad_rows: drop leaves such lines out, counted)")
    if not rows:
        return Dataset.from_dict({column: [] for column in TEXT_COLUMNS}), dropped
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns}), dropped


def check_schema(dataset: Dataset) -> list[str]:
    """Raise naming the column when a text column is missing or not text; return the columns that are ignored."""
    found = list(dataset.column_names)
    if "conversations" in found and "user" not in found:
        raise ValueError(
            "dataset is already in ShareGPT form (a 'conversations' column); this pipeline converts "
            f"{list(TEXT_COLUMNS)} rows itself with to_sharegpt, so give it rows in that schema"
        )
    for column in TEXT_COLUMNS:
        if column not in found:
            raise ValueError(f"dataset has no '{column}' column; expected {list(TEXT_COLUMNS)}, found {found}")
        feature = dataset.features[column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")):
            raise ValueError(f"column '{column}' must hold text, found {feature}")
    return [column for column in found if column not in TEXT_COLUMNS]


def row_digests(table: Any, columns: tuple[str, ...] = TEXT_COLUMNS, batch_rows: int = 65536) -> Any:
    """The `finetune.data.files.digests` of each row's texts in `columns`, batch by batch."""
    parts = []
    for batch in table.select(list(columns)).to_batches(max_chunksize=batch_rows):
        texts = zip(*(batch.column(c).to_pylist() for c in columns), strict=True)
        # the lengths in front tell where each text ends: ("ab", "c") and ("a", "bc") differ
        parts.append(digests([",".join(str(len(t)) for t in row[:-1]) + "," + "".join(row) for row in texts]))
    return np.concatenate(parts) if parts else np.empty((0, 2), np.uint64)


def blank(cells: Any) -> Any:
    """Arrow mask of the text cells that are empty or all Unicode whitespace (no trimmed copy of the column)."""
    import pyarrow.compute as pc

    return pc.or_(pc.equal(cells, ""), pc.utf8_is_space(cells))


def same_as_held_out(train: Dataset, held_out: Dataset) -> np.ndarray:
    """Mask of the training rows whose question and answer are those of a held-out row, whatever their system
    texts: trained on, they would put the held-out answers into training."""
    pair = ("user", "assistant")

    def keys(rows: Dataset) -> np.ndarray:  # a split's rows, gathered a batch at a time
        batches = rows.with_format("arrow").iter(batch_size=65536)
        return np.concatenate([row_digests(batch, pair) for batch in batches] or [np.empty((0, 2), np.uint64)])

    number, _ = distinct(np.concatenate([keys(held_out), keys(train)]))  # held-out texts get the lowest numbers
    held_out_texts = int(number[: len(held_out)].max()) + 1 if len(held_out) else 0
    return number[len(held_out) :] < held_out_texts


def clean(dataset: Dataset, config: FetchConfig) -> tuple[Dataset, dict[str, int]]:
    """Keep the text columns, null cells as `""`; drop rows by the enabled rules; count every row's fate.

    Rules apply in order (empty question, empty answer, duplicate), each row counted under the first that drops it.
    `[{"system": None, "user": "q", "assistant": ""}]` -> no rows, `{"rows_in": 1, "dropped_empty_answer": 1, ...}`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.table import InMemoryTable

    source = dataset.with_format("arrow")[:]
    null_cells = sum(source[column].null_count for column in TEXT_COLUMNS)
    table = pa.table({column: pc.fill_null(source[column].cast(pa.string()), "") for column in TEXT_COLUMNS})
    n = table.num_rows

    no = pa.array([False] * n, pa.bool_())
    empty_user = blank(table["user"]) if config.drop_empty_user else no
    empty_answer = pc.and_not(blank(table["assistant"]), empty_user) if config.drop_empty_answer else no
    alive = pc.invert(pc.or_(empty_user, empty_answer))
    duplicate = no
    if config.drop_duplicates:
        # the first row of each distinct (system, user, assistant) among the rows still alive, found by a 16-byte
        # digest per row (a hash table of the texts themselves would cost gigabytes on 518k rows); a whitespace-only
        # system counts as empty, as to_sharegpt renders it: rows that differ only there are one conversation
        alive_rows = np.flatnonzero(alive.to_numpy(zero_copy_only=False))
        system = pc.if_else(blank(table["system"]), "", table["system"])
        _, first = distinct(row_digests(table.set_column(0, "system", system))[alive_rows])
        is_duplicate = np.ones(len(alive_rows), dtype=bool)
        is_duplicate[first] = False
        mask = np.zeros(n, dtype=bool)
        mask[alive_rows[is_duplicate]] = True
        duplicate = pa.array(mask)
    kept = pc.invert(pc.or_(pc.invert(alive), duplicate))

    def count(mask: pa.Array) -> int:
        return int(pc.sum(mask).as_py() or 0)

    counts = {
        "rows_in": n,
        "rows_kept": count(kept),
        "null_cells_as_empty": null_cells,
        "dropped_empty_user": count(empty_user),
        "dropped_empty_answer": count(empty_answer),
        "dropped_duplicate": count(duplicate),
    }
    dropped = sum(value for key, value in counts.items() if key.startswith("dropped_"))
    assert counts["rows_in"] == counts["rows_kept"] + dropped, f"row accounting does not add up: {counts}"
    # an explicit fingerprint: without one, datasets hashes the whole in-memory table (4.5 GB peak on 518k rows)
    fingerprint = hashlib.sha256(f"{dataset._fingerprint} {config}".encode()).hexdigest()[:32]
    return Dataset(InMemoryTable(table.filter(kept)), fingerprint=fingerprint), counts


def split(dataset: Dataset, eval_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Draw `eval_size` held-out rows at random (by `seed`); return `(train, eval)`, disjoint by row."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows left to train on")
    if eval_size >= len(dataset):
        raise ValueError(f"fetch.eval_size ({eval_size}) must be smaller than the dataset ({len(dataset)} rows)")
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def write_rows(dataset: Dataset, path: Path) -> None:
    """A split's rows as parquet, in row groups of `ROWS_PER_GROUP`, gathered in one take (datasets' `to_parquet`
    gathers a shuffled split batch by batch: 18 of fetch's 33 s on 518k rows)."""
    import pyarrow.parquet as pq

    pq.write_table(dataset.with_format("arrow")[:], path, row_group_size=ROWS_PER_GROUP)


def clean_and_split(
    dataset: Dataset, config: FetchConfig, bad_lines: dict[str, list[int]]
) -> tuple[Dataset, Dataset, dict[str, int]]:
    """`clean`, `split`, and the training rows that repeat a held-out question and answer dropped: the training
    and held-out rows, and every row's fate counted (the lines `read_jsonl` left out, `bad_lines`, among them)."""
    cleaned, counts = clean(dataset, config)
    counts["rows_in"] += sum(len(lines) for lines in bad_lines.values())
    counts |= {f"dropped_{reason}": len(lines) for reason, lines in bad_lines.items()}
    train, held_out = split(cleaned, config.eval_size, config.seed)
    leaking = same_as_held_out(train, held_out)
    train = train.select(np.flatnonzero(~leaking))
    counts |= {"rows_kept": counts["rows_kept"] - int(leaking.sum()), "dropped_same_as_held_out": int(leaking.sum())}
    dropped = sum(value for key, value in counts.items() if key.startswith("dropped_"))
    assert counts["rows_in"] == len(train) + len(held_out) + dropped, f"row accounting does not add up: {counts}"
    return train, held_out, counts
