"""to_sharegpt: turn system/user/assistant rows into ShareGPT conversations with unsloth's own `to_sharegpt`.

    python -m stages.to_sharegpt --data data/raw --out data/sharegpt --metrics metrics/to_sharegpt.json

Training rows are merged `conversation_extension` at a time into multi-turn conversations, as unsloth does;
held-out rows stay single-turn so that each is scored on its own. A training row that the merge renders as a held-out
row (its `user` text holding a held-out row's question and system text as the merged prompt joins them, with the same
answer) is dropped and counted: fetch, which compares the raw columns, cannot see it. Text only: no tokenizer, model
or chat template is read here (the tokenize stage encodes the conversations), so changing the model does not rerun
this stage. unsloth's conversion runs on ranges of rows in a worker per core (`finetune.data.parallel`), in memory,
in order.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from finetune.config import cli
from finetune.config.params import load, require
from finetune.data.conversion import (
    OPTIONAL,
    ToSharegptConfig,
    convert,
    held_out_copies,
    prompt_columns,
    whitespace_only,
)
from finetune.data.files import ROWS_PER_GROUP, write_json
from finetune.data.parallel import STATE, cores, read_rows, row_ranges, run
from finetune.data.sharegpt import extension_orders, write_extended

log = logging.getLogger("to_sharegpt")


def check_columns(config: ToSharegptConfig, columns: list[str], source: Path) -> None:
    """Refuse a merged prompt or an answer column that names no column of `source` (whose columns are `columns`),
    and a merged prompt that would leave out a row's question: `{user}` only inside a `[[...]]` part, or not at all.

    `check_columns(config, ["system", "user", "assistant"], Path("data/raw/train.parquet"))` with
    `merged_prompt: "{question}"` raises `ValueError: to_sharegpt.merged_prompt names {question}, not a column of
    data/raw/train.parquet (system, user, assistant)`.
    """
    where = f"not a column of {source} ({', '.join(columns)})"
    for column in prompt_columns(config.merged_prompt):
        require(column in columns, f"to_sharegpt.merged_prompt names {{{column}}}, {where}")
    answer = config.output_column_name
    require(answer in columns, f"to_sharegpt.output_column_name names {answer}, {where}")
    require(  # unsloth leaves a [[...]] part out wherever its first column is empty
        "user" in prompt_columns(OPTIONAL.sub("", config.merged_prompt)),
        "to_sharegpt.merged_prompt must hold {user}, each row's question, outside any [[...]] part; "
        f"got {config.merged_prompt!r}",
    )


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


def whitespace_cells(dataset: Dataset, columns: list[str]) -> int:
    """How many cells of `columns` are non-empty but whitespace only (those `blank_whitespace` empties)."""
    import pyarrow.compute as pc

    return sum(int(pc.sum(whitespace_only(dataset.data.column(c))).as_py()) for c in columns)


def converted(source: Path, config: ToSharegptConfig, split: str) -> tuple[pa.ChunkedArray, dict[str, int]]:
    """The rows of parquet file `source` as one-turn conversations, in order (`convert_rows` in a worker per core),
    with the `split`'s counts: rows in, whitespace-only cells blanked."""
    ranges = [(source, start, stop) for start, stop in row_ranges(source, ROWS_PER_GROUP)]
    require(bool(ranges), f"{source}: no rows to convert")
    tables = list(run(convert_rows, ranges, cores(), {"config": config}))
    single = pa.concat_tables([table for table, _ in tables]).column("conversations")
    counts = {f"{split}_rows_in": ranges[-1][2], f"{split}_whitespace_cells_blanked": sum(n for _, n in tables)}
    return single, counts


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  (before transformers, as unsloth asks)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per range of rows and worker would interleave
    config = load(ToSharegptConfig, params_path, "to_sharegpt")
    log.info("config: %s", asdict(config))

    for source in (data / "train.parquet", data / "eval.parquet"):  # both checked before either is converted
        check_columns(config, pq.read_schema(source).names, source)
    out.mkdir(parents=True, exist_ok=True)
    # the few held-out rows first: the training rows' workers then fork from a process that holds little
    held_out, eval_counts = converted(data / "eval.parquet", config, "eval")
    train, train_counts = converted(data / "train.parquet", config, "train")

    # a training row the merge renders as a held-out row: fetch compared the raw columns, not these
    copies = held_out_copies(train, held_out)
    dropped = int(copies.sum())
    if dropped:
        train = train.filter(pa.array(~copies))
        log.warning("%d training row(s) render as a held-out row once merged: dropped", dropped)
    require(len(train) > 0, f"no training rows left of {dropped}: each renders as a held-out row once merged")

    # training rows merged conversation_extension at a time; held-out rows single-turn
    counts = {**train_counts, "train_dropped_same_as_held_out": dropped, **eval_counts}
    for split, single, extension in (("train", train, config.conversation_extension), ("eval", held_out, 1)):
        write_extended(single, extension_orders(len(single), extension, config.random_state), out / f"{split}.parquet")
        conversations = pq.ParquetFile(out / f"{split}.parquet").metadata.num_rows  # counted without reading
        # one conversation per row kept: the extension pairs each row with rows of shuffled copies
        assert conversations == len(single), f"{split}: {len(single)} rows kept, {conversations} conversations out"
        counts[f"{split}_conversations"] = conversations
        log.info("%s: %d conversations -> %s", split, conversations, out / f"{split}.parquet")
    write_json(metrics, counts)


if __name__ == "__main__":
    main(**cli.arguments(__doc__, data="folder of fetch's splits", out="folder of the conversations", metrics="JSON"))
