"""unsloth's `conversation_extension` done in Arrow: the same conversations as its shuffles and row-by-row merge
make, written batch by batch without the copies that cost it minutes and gigabytes on 518k rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def extension_orders(n: int, conversation_extension: int, random_state: int) -> list[Any]:
    """The rows of each conversation: conversation i is rows `orders[0][i], orders[1][i], ...`.

    unsloth appends to row `i` the rows `perm_j[i]` of `single.shuffle(seed=random_state + j)` for
    j = 1 .. extension - 1, where a shuffle's permutation is `np.random.default_rng(seed).permutation(n)`.
    """
    return [np.arange(n)] + [
        np.random.default_rng(random_state + j).permutation(n) for j in range(1, conversation_extension)
    ]


def write_extended(single: pa.ChunkedArray, orders: list[Any], path: Path, rows_per_batch: int = 32768) -> None:
    """Write the conversations `orders` make of the one-turn conversations `single` to a parquet file.

    The same permutations as unsloth's shuffles give the same conversations with Arrow `take`s, written batch by
    batch, without the shuffled copies and the row-by-row Python merge that cost unsloth minutes and gigabytes on
    518k rows. Only one batch's messages are ever copied. A test holds the output equal to unsloth's own.
    """
    schema = pa.schema([("conversations", single.type)])
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, max(len(single), 1), rows_per_batch):
            rows = np.arange(first, min(first + rows_per_batch, len(single)))
            # row i's parts, one after another: its own messages, then those of orders[1][i], ...
            parts = take_rows(single, np.stack([order[rows] for order in orders], axis=1).ravel())
            sizes = pc.list_value_length(parts).to_numpy(zero_copy_only=False).reshape(-1, len(orders)).sum(axis=1)
            offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int32())
            merged = pa.ListArray.from_arrays(offsets, parts.flatten())
            writer.write_table(pa.table({"conversations": merged}, schema=schema))


def take_rows(column: Any, indices: Any) -> Any:
    """`column[indices]` as one array, taken chunk by chunk: Arrow's own `take` on a chunked list column first
    concatenates every chunk, a copy of the whole column for each batch."""
    bounds = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    chunk_of = np.searchsorted(bounds, indices, side="right") - 1
    grouped = np.argsort(chunk_of, kind="stable")  # the indices chunk by chunk
    chunks, starts = np.unique(chunk_of[grouped], return_index=True)
    taken = [
        column.chunk(c).take(pa.array(indices[positions] - bounds[c], pa.int64()))
        for c, positions in zip(chunks, np.split(grouped, starts[1:]), strict=True)
    ]
    in_chunk_order = pa.concat_arrays(taken) if taken else pa.array([], column.type)
    return in_chunk_order.take(pa.array(np.argsort(grouped), pa.int64()))  # back in the order asked
