"""to_sharegpt: turn system/user/assistant rows into ShareGPT conversations with unsloth's own `to_sharegpt`.

    python -m stages.to_sharegpt --data data/raw --out data/sharegpt --metrics metrics/to_sharegpt.json

Training rows are merged `conversation_extension` at a time into multi-turn conversations, as unsloth does;
held-out rows stay single-turn so that each is scored on its own. Text only: no tokenizer, model or chat template
is read here (the tokenize stage encodes the conversations), so changing the model does not rerun this stage.
unsloth's conversion runs on ranges of rows in a worker per core (`stages.workers`), in memory, in order.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from stages import params
from stages.files import write_json
from stages.params import require
from stages.workers import STATE, cores, read_rows, row_ranges, run

log = logging.getLogger("to_sharegpt")

ROWS_PER_TASK = 32768  # rows a worker converts at a time: one row group of fetch's files


@dataclass(frozen=True)
class ToSharegptConfig:
    merged_prompt: str  # how columns merge into the user turn; [[...]] is left out when its column is empty
    output_column_name: str  # column holding the assistant's answer
    conversation_extension: int  # training rows merged into one conversation (1 = none)
    random_state: int  # seed of unsloth's shuffles that pick the rows merged together

    def __post_init__(self) -> None:
        require(bool(prompt_columns(self.merged_prompt)), "to_sharegpt.merged_prompt must name a {column}")
        require(
            self.conversation_extension >= 1,
            f"to_sharegpt.conversation_extension must be >= 1, got {self.conversation_extension}",
        )


def prompt_columns(merged_prompt: str) -> list[str]:
    """The columns a merged prompt names: `prompt_columns("{user}[[ in: {system}]]")` -> `['user', 'system']`."""
    return list(dict.fromkeys(re.findall(r"\{(\w+)\}", merged_prompt)))


def whitespace_only(cells: Any) -> Any:
    """Arrow mask of the cells that are non-empty and all whitespace; null cells are not."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.utf8_is_space(cells), False)


def blank_whitespace(dataset: Dataset, columns: list[str]) -> Dataset:
    """Replace whitespace-only cells of `columns` with `""`.

    unsloth keeps an optional `[[...]]` part whenever its column is not exactly `""`; the real data's `"\\n"`
    system prompts would otherwise add an empty "Your input is:" block. `{"system": "\\n"}` -> `{"system": ""}`.
    """
    import pyarrow.compute as pc

    def blank(batch: Any) -> Any:
        for column in columns:
            cells = batch[column]
            blanked = pc.if_else(whitespace_only(cells), "", cells)
            batch = batch.set_column(batch.schema.get_field_index(column), column, blanked)
        return batch

    return dataset.with_format("arrow").map(blank, batched=True, desc="Blanking whitespace-only cells").with_format()


def convert(dataset: Dataset, config: ToSharegptConfig) -> Dataset:
    """unsloth's `to_sharegpt` with this stage's settings on whitespace-blanked rows: one conversation per row."""
    from unsloth.chat_templates import to_sharegpt

    columns = [c for c in prompt_columns(config.merged_prompt) if c in dataset.column_names]
    return to_sharegpt(
        blank_whitespace(dataset, columns),
        merged_prompt=config.merged_prompt,
        output_column_name=config.output_column_name,
        conversation_extension=1,
    )


def extension_orders(n: int, conversation_extension: int, random_state: int) -> list[Any]:
    """The rows of each conversation: conversation i is rows `orders[0][i], orders[1][i], ...`.

    unsloth appends to row `i` the rows `perm_j[i]` of `single.shuffle(seed=random_state + j)` for
    j = 1 .. extension - 1, where a shuffle's permutation is `np.random.default_rng(seed).permutation(n)`.
    """
    import numpy as np

    return [np.arange(n)] + [
        np.random.default_rng(random_state + j).permutation(n) for j in range(1, conversation_extension)
    ]


def convert_rows(task: tuple[Path, int, int]) -> tuple[pa.Table, int]:
    """`convert` of rows `start` to `stop` of a parquet file, in memory (no cache file written); the table of their
    one-turn conversations and how many whitespace-only cells were blanked."""
    from datasets.table import InMemoryTable

    source, start, stop = task
    config = STATE["config"]
    rows = Dataset(InMemoryTable(read_rows(source, start, stop)))
    blanked = whitespace_cells(rows, prompt_columns(config.merged_prompt))
    single = convert(rows, config).data.table
    assert single.num_rows == stop - start, f"{source}: rows {start}-{stop}, {single.num_rows} conversations"
    return single, blanked


def write_extended(single: pa.ChunkedArray, orders: list[Any], path: Path, rows_per_batch: int = 32768) -> None:
    """Write the conversations `orders` make of the one-turn conversations `single` to a parquet file.

    The same permutations as unsloth's shuffles give the same conversations with Arrow `take`s, written batch by
    batch, without the shuffled copies and the row-by-row Python merge that cost unsloth minutes and gigabytes on
    518k rows. Only one batch's messages are ever copied. A test holds the output equal to unsloth's own.
    """
    import numpy as np
    import pyarrow.compute as pc

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
    import numpy as np

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


def whitespace_cells(dataset: Dataset, columns: list[str]) -> int:
    """How many cells of `columns` are non-empty but whitespace only (those `blank_whitespace` empties)."""
    import pyarrow.compute as pc

    return sum(int(pc.sum(whitespace_only(dataset.data.column(c))).as_py()) for c in columns)


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  (before transformers, as unsloth asks)
    from datasets.utils.logging import disable_progress_bar

    # force: importing unsloth has configured the root logger already, which would silence this one
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    disable_progress_bar()  # one bar per range of rows and worker would interleave
    config = params.load(ToSharegptConfig, params_path, "to_sharegpt")
    log.info("config: %s", asdict(config))

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, extension in (("train", config.conversation_extension), ("eval", 1)):
        source = data / f"{split}.parquet"
        ranges = [(source, start, stop) for start, stop in row_ranges(source, ROWS_PER_TASK)]
        require(bool(ranges), f"{source}: no rows to convert")
        converted = list(run(convert_rows, ranges, cores(), {"config": config}))
        single = pa.concat_tables([table for table, _ in converted]).column("conversations")
        rows_in, blanked = ranges[-1][2], sum(blanked for _, blanked in converted)
        orders = extension_orders(len(single), extension, config.random_state)
        write_extended(single, orders, out / f"{split}.parquet")
        conversations = pq.ParquetFile(out / f"{split}.parquet").metadata.num_rows  # counted without reading
        # one conversation per row: the extension pairs each row with rows of shuffled copies
        assert conversations == rows_in, f"{split}: {rows_in} rows in, {conversations} conversations out"
        counts |= {
            f"{split}_rows_in": rows_in,
            f"{split}_conversations": conversations,
            f"{split}_whitespace_cells_blanked": blanked,
        }
        log.info("%s: %d conversations -> %s", split, conversations, out / f"{split}.parquet")
    write_json(metrics, counts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.out, args.metrics)
