"""Small file helpers shared by the stages: metrics as JSON, plots as CSV, file and text digests.

No MLflow here: a stage that only writes files (fetch, to_sharegpt, standardize, tokenize) depends on this module
alone, so a change to the tracking code does not rerun the data stages.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARK_MANIFEST = "benchmarks.json"  # the benchmarks stage's list of its benchmarks, which evaluate reads
ROWS_PER_GROUP = 32768  # rows per parquet row group fetch writes, and the rows a worker of the next stages takes


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON so the file diffs cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Rows as a CSV file with a header, as `dvc plots` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def file_hash(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes. MD5 (the default) is the hash DVC 3 records for a file in dvc.lock and its
    cache; fetch records a source file's SHA-256, and evaluate finds the run that trained an adapter by the SHA-256
    of its weights."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def digests(texts: list[str]) -> np.ndarray:
    """A 128-bit BLAKE2b digest of each text, as two uint64 columns: equal digests mean equal texts (fetch finds
    duplicate rows by them, tokenize the texts it encodes once, without a hash table of the texts themselves)."""
    joined = b"".join(hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts)
    return np.frombuffer(joined, np.uint64).reshape(-1, 2)


def distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each item's digest (`digests`; or several side by side, one row per item): its text's number, texts
    numbered in the order they first occur, and each number's first item. `distinct([a, b, a])` ->
    `([0, 1, 0], [0, 1])`."""
    order = np.lexsort(keys.T[::-1])  # the first column first; stable: the items of one text stay in order
    ordered = keys[order]
    new = np.ones(len(order), bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    first = order[new]  # each text's first item
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    number = np.empty(len(order), np.int64)
    number[order] = rank[np.cumsum(new) - 1]
    return number, np.sort(first)
