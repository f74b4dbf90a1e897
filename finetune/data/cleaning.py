"""The `fetch` section and its rules: rows of the dataset's schema read and checked, cleaned with every dropped row
counted by reason, the held-out rows drawn, and no held-out question and answer left in training.

Every row's fate is counted: `rows_in = rows_kept + sum(dropped_*)`. Rows are compared as their texts `normalised`
(`finetune.data.near_copies`: NFKC, runs of whitespace as one space, no space at the ends; a whitespace-only system
so counts as empty, as to_sharegpt renders it); the rows written keep their texts as they came. Repeats are dropped
before the held-out draw, counted apart: the same text (`duplicate`) or the same once normalised (`near_duplicate`).
A training row with the question and answer of a held-out row, whatever its system text, is dropped too
(`same_as_held_out`), and one that holds a run of `held_out_ngram` words of a held-out answer in any of its texts
(`held_out_ngram`, while `drop_held_out_ngram` is on; counted either way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value

from finetune.config.params import require
from finetune.data import parallel
from finetune.data.files import ROWS_PER_GROUP, digests, distinct
from finetune.data.near_copies import row_keys, sharing_answers
from finetune.data.sources import decoded_line

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
    drop_duplicates: bool  # drop repeats of (system, user, assistant), compared normalised, keeping the first
    bad_rows: str = "error"  # a .jsonl line that is no JSON object of text cells: error (named) or drop (counted)
    held_out_ngram: int = 13  # words in a run shared with a held-out answer that make a training row its near-copy
    drop_held_out_ngram: bool = True  # drop the training rows held_out_ngram finds (false: count them only)

    def __post_init__(self) -> None:
        require(bool(self.dataset.strip()), "fetch.dataset must not be empty")
        require(self.held_out_ngram >= 1, f"fetch.held_out_ngram must be >= 1, got {self.held_out_ngram}")
        require(self.bad_rows in ("error", "drop"), f"fetch.bad_rows must be error or drop, got {self.bad_rows!r}")
        require(self.eval_size >= 1, f"fetch.eval_size must be >= 1, got {self.eval_size}")
        require(self.seed >= 0, f"fetch.seed must be >= 0, got {self.seed}")  # numpy's generators take no other


def bad_line(path: Path, number: int, raw: bytes) -> tuple[str | None, Any]:
    """A JSON-lines line read: `(None, row)`, or `(reason, message)` for a line that is no JSON object of text cells
    (`unreadable_line`: not UTF-8, not JSON, not an object; `non_text_cell`: a number, list ... in a text column)."""
    try:
        line = decoded_line(path, number, raw)
    except ValueError as error:
        return "unreadable_line", str(error)
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
        try:  # JSON's \ud800 escape reads as a lone surrogate: no Unicode text, which no file can hold
            (cell or "").encode("utf-8")
        except UnicodeEncodeError as error:
            return "non_text_cell", (
                f"{path} line {number}: column '{column}' holds a lone surrogate {cell[error.start]!r} at character "
                f"{error.start}, not valid Unicode text"
            )
    return None, row


def read_jsonl(path: Path, bad_rows: str = "error") -> tuple[Dataset, dict[str, list[int]], list[str]]:
    """Read a JSON-lines file; a bad line (`bad_line`) stops it naming the line, or with `bad_rows: drop` is left
    out. Returns the rows' text columns, the numbers of the lines left out, by reason, and the other keys found (not
    read: a key of a number here and a text there would not make one column). A byte-order mark at the start of the
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
    keys = list(dict.fromkeys(key for row in rows for key in row)) if rows else list(TEXT_COLUMNS)
    columns = [key for key in keys if key in TEXT_COLUMNS]
    features = Features({column: Value("string") for column in columns})
    texts = Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns}, features=features)
    return texts, dropped, [key for key in keys if key not in TEXT_COLUMNS]


def check_schema(dataset: Dataset, unread: list[str] | None = None) -> list[str]:
    """Raise naming the column when a text column is missing or not text; return the columns that are ignored, with
    those of the file that were `unread` (`read_jsonl`'s other keys)."""
    found = list(dataset.column_names) + list(unread or [])
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
            row, cell = next(
                ((i, cell) for i, cell in enumerate(dataset[column]) if cell is not None and not isinstance(cell, str)),
                (None, None),
            )
            where = f": row {row} holds {type(cell).__name__} {cell!r}" if row is not None else ""
            raise ValueError(f"column '{column}' must hold text, found {feature}{where}")
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


def same_as_held_out(train_keys: np.ndarray, held_out_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which training rows have the question and answer of a held-out row, whatever their system texts (trained
    on, they would put the held-out answers into training), and which held-out rows have such a copy; each row
    by its texts' digests (`clean`: system, user, assistant, two columns each)."""
    pair = slice(2, 6)  # the question's and the answer's digests
    number, _ = distinct(np.concatenate([held_out_keys[:, pair], train_keys[:, pair]]))  # held-out texts first
    held_out, train = number[: len(held_out_keys)], number[len(held_out_keys) :]
    copies = train < (int(held_out.max()) + 1 if len(held_out) else 0)
    return copies, np.isin(held_out, train[copies])


def clean(dataset: Dataset, config: FetchConfig) -> tuple[Any, np.ndarray, dict[str, int], np.ndarray]:
    """Keep the text columns, null cells as `""`; drop rows by the enabled rules; count every row's fate. Returns
    the rows as one Arrow table in one piece (a row's texts are taken from it at any place at little cost), the
    numbers of the rows kept, the counts, and the digests of every row's texts normalised (system, user, assistant:
    two uint64 columns each, `finetune.data.near_copies.row_keys`), which tell copies apart.

    Rules apply in order (empty question, empty answer, duplicate), each row counted under the first that drops it.
    `[{"system": None, "user": "q", "assistant": ""}]` -> no rows kept, `{"rows_in": 1, "dropped_empty_answer": 1,
    ...}`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    source = dataset.with_format("arrow")[:]
    null_cells = sum(source[column].null_count for column in TEXT_COLUMNS)
    # large_string: one piece of any size (`write_rows` writes the dataset's string type back)
    table = pa.table({c: pc.fill_null(source[c].cast(pa.large_string()), "").combine_chunks() for c in TEXT_COLUMNS})
    n = table.num_rows
    # 16 bytes per text (a hash table of the texts themselves would cost gigabytes on 518k rows)
    keys = row_keys(table, parallel.cores())

    no = np.zeros(n, dtype=bool)
    empty_user = blank(table["user"]).to_numpy(zero_copy_only=False) if config.drop_empty_user else no
    empty_answer = blank(table["assistant"]).to_numpy(zero_copy_only=False) & ~empty_user
    empty_answer = empty_answer if config.drop_empty_answer else no
    alive_rows = np.flatnonzero(~(empty_user | empty_answer))
    duplicate, near_duplicate = no.copy(), no.copy()
    if config.drop_duplicates:
        # the first row of each distinct normalised (system, user, assistant) among the rows still alive
        number, first = distinct(keys[alive_rows])
        repeat = np.ones(len(alive_rows), dtype=bool)
        repeat[first] = False
        # a repeat is a duplicate when its texts as they came, a whitespace-only system as empty (as to_sharegpt
        # renders it), are those of an earlier row, else a near-duplicate: told apart among recurring rows alone
        recurring = alive_rows[np.bincount(number)[number] > 1]
        system = pc.if_else(blank(table["system"]), "", table["system"])
        _, first_as_is = distinct(row_digests(table.set_column(0, "system", system).take(pa.array(recurring))))
        duplicate[recurring] = True
        duplicate[recurring[first_as_is]] = False
        near_duplicate[alive_rows[repeat]] = True
        near_duplicate &= ~duplicate
    kept = ~(empty_user | empty_answer | duplicate | near_duplicate)

    counts = {
        "rows_in": n,
        "rows_kept": int(kept.sum()),
        "null_cells_as_empty": null_cells,
        "dropped_empty_user": int(empty_user.sum()),
        "dropped_empty_answer": int(empty_answer.sum()),
        "dropped_duplicate": int(duplicate.sum()),
        "dropped_near_duplicate": int(near_duplicate.sum()),
    }
    dropped = sum(value for key, value in counts.items() if key.startswith("dropped_"))
    assert counts["rows_in"] == counts["rows_kept"] + dropped, f"row accounting does not add up: {counts}"
    return table, np.flatnonzero(kept), counts, keys


def draw(rows: int, eval_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and the held-out row numbers of `rows` rows: `eval_size` held out at random by `seed`, the same
    draw as `datasets`' `train_test_split(test_size=eval_size, seed=seed)`, the rest in the order it gives them."""
    if rows == 0:
        raise ValueError("the dataset has no rows left to train on")
    if eval_size >= rows:
        raise ValueError(f"fetch.eval_size ({eval_size}) must be smaller than the dataset ({rows} rows)")
    permutation = np.random.default_rng(seed).permutation(rows)
    return permutation[eval_size:], permutation[:eval_size]


def write_rows(table: Any, rows: np.ndarray, path: Path) -> None:
    """The `rows` of `table` (their numbers, in that order) as parquet, a row group of `ROWS_PER_GROUP` rows taken
    at a time, the texts as `string` (the dataset's type)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(column, pa.string()) for column in table.column_names])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(rows), ROWS_PER_GROUP) if len(rows) else [0]:
            writer.write_table(table.take(rows[start : start + ROWS_PER_GROUP]).cast(schema))


def clean_and_split(
    dataset: Dataset, config: FetchConfig, bad_lines: dict[str, list[int]]
) -> tuple[Any, np.ndarray, np.ndarray, dict[str, int]]:
    """`clean`, `draw`, and the training rows that copy a held-out row dropped: the table of rows, the numbers of
    its training and its held-out rows, and every row's fate counted (the lines `read_jsonl` left out,
    `bad_lines`, among them), with how many held-out rows had a copy or near-copy in training
    (`held_out_rows_with_near_copies`)."""
    table, kept, counts, keys = clean(dataset, config)
    counts["rows_in"] += sum(len(lines) for lines in bad_lines.values())
    counts |= {f"dropped_{reason}": len(lines) for reason, lines in bad_lines.items()}
    require(len(kept) > 0, f"fetch: no rows left of {counts['rows_in']} to train on: {fates(counts)}")
    train_rows, held_out_rows = (kept[drawn] for drawn in draw(len(kept), config.eval_size, config.seed))
    same, copied = same_as_held_out(keys[train_rows], keys[held_out_rows])
    train_rows = train_rows[~same]
    # the rest, searched for runs of the held-out answers' words
    answers = table.column("assistant").take(held_out_rows).to_pylist()
    searched = np.zeros(table.num_rows, dtype=bool)
    searched[train_rows] = True
    holding, answered = sharing_answers(table, searched, answers, config.held_out_ngram, parallel.cores())
    sharing = holding[train_rows]
    dropped_sharing = sharing if config.drop_held_out_ngram else np.zeros(len(sharing), dtype=bool)
    train_rows = train_rows[~dropped_sharing]
    counts |= {
        "rows_kept": len(train_rows) + len(held_out_rows),
        "dropped_same_as_held_out": int(same.sum()),
        "dropped_held_out_ngram": int(dropped_sharing.sum()),
        "train_rows_sharing_held_out_ngram": int(sharing.sum()),
        "held_out_rows_with_near_copies": int((copied | answered).sum()),
    }
    dropped = sum(value for key, value in counts.items() if key.startswith("dropped_"))
    assert counts["rows_in"] == counts["rows_kept"] + dropped, f"row accounting does not add up: {counts}"
    require(
        len(train_rows) > 0,
        f"fetch: no training rows left of {counts['rows_in']}, {len(held_out_rows)} held out: {fates(counts)}",
    )
    return table, train_rows, held_out_rows, counts


def fates(counts: dict[str, int]) -> str:
    """The rows dropped, by reason, the reasons that dropped none left out: `"dropped_empty_answer 3"`."""
    dropped = [f"{key} {value}" for key, value in counts.items() if key.startswith("dropped_") and value]
    return ", ".join(dropped) or "none dropped"
