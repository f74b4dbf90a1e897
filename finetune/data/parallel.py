"""Work spread over the cores: ranges of a parquet file's rows, each handled by a forked worker process, in order.

to_sharegpt, standardize and tokenize split their input into ranges of rows and run a module-level task on each
range in a pool of forked processes, one per core this process may run on (`cores`). Results come back in the
ranges' order, so a stage's output depends on neither the number of cores nor their timing. The pool is forked
after the parent has imported its libraries and loaded what the workers share (`state`: a tokenizer, settings,
arrays), so none of that is loaded again or pickled.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STATE: dict[str, Any] = {}  # what the worker processes of one `run` share, set once in each by `_init`


def cores() -> int:
    """The cores this process may run on (its affinity mask: `taskset` or a container's cpuset)."""
    return len(os.sched_getaffinity(0))


def _init(state: dict[str, Any]) -> None:
    STATE.clear()
    STATE.update(state)


def run(task: Callable[[Any], Any], items: list[Any], workers: int, state: dict[str, Any]) -> Iterator[Any]:
    """`task(item)` of each item, in order, over `workers` processes forked with `state` in `STATE` (one item or
    one worker: in this process)."""
    if min(workers, len(items)) <= 1:
        _init(state)
        try:
            yield from map(task, items)
        finally:
            STATE.clear()
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(items)), _init, (state,)) as pool:
        yield from pool.imap(task, items)


def row_ranges(source: Path, rows: int) -> list[tuple[int, int]]:
    """`(start, stop)` of each run of `rows` rows of a parquet file, in order: `[(0, rows), (rows, 2 * rows), ...]`."""
    total = pq.ParquetFile(source).metadata.num_rows
    return [(start, min(start + rows, total)) for start in range(0, total, rows)]


def read_rows(source: Path, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows `start` to `stop` of a parquet file, reading only the row groups that hold them."""
    file = pq.ParquetFile(source)
    bounds = np.cumsum([0] + [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
    groups = [i for i in range(file.num_row_groups) if bounds[i] < stop and bounds[i + 1] > start]
    if not groups:
        return file.schema_arrow.empty_table().select(columns or file.schema_arrow.names)
    return file.read_row_groups(groups, columns=columns).slice(start - int(bounds[groups[0]]), stop - start)
