"""standardize: map ShareGPT turns to role/content messages with unsloth's `standardize_sharegpt`.

    python -m stages.standardize --data data/sharegpt --out data/standardized --metrics metrics/standardize.json

`{"from": "human", "value": ...}` becomes `{"role": "user", "content": ...}` and `gpt` becomes `assistant`,
the form that chat templates and TRL's `SFTTrainer` read. unsloth's function runs on ranges of conversations in a
worker per core (`finetune.data.parallel`), in memory, written in order.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from datasets.table import InMemoryTable

from finetune.config import cli
from finetune.config.params import load, require
from finetune.data.files import ROWS_PER_GROUP, write_json
from finetune.data.parallel import STATE, cores, read_rows, row_ranges, run

log = logging.getLogger("standardize")


@dataclass(frozen=True)
class StandardizeConfig:
    aliases_for_system: list[str]  # ShareGPT role names read as "system"
    aliases_for_user: list[str]  # ... as "user"
    aliases_for_assistant: list[str]  # ... as "assistant"

    def __post_init__(self) -> None:
        for role in ("system", "user", "assistant"):
            require(bool(getattr(self, f"aliases_for_{role}")), f"standardize.aliases_for_{role} must not be empty")
        for role, written in (("user", "human"), ("assistant", "gpt")):  # unsloth's to_sharegpt's roles
            aliases = getattr(self, f"aliases_for_{role}")
            require(
                written in (alias.strip().lower() for alias in aliases),  # as unsloth compares them
                f"standardize.aliases_for_{role} must include '{written}', the role to_sharegpt writes; got {aliases}",
            )


def standardize(dataset: Dataset, config: StandardizeConfig) -> Dataset:
    """unsloth's `standardize_sharegpt` with this stage's role aliases, in this process (`standardize_file` runs
    the workers)."""
    from unsloth import standardize_sharegpt

    return standardize_sharegpt(dataset, **asdict(config), num_proc=1)


def standardize_rows(task: tuple[Path, int, int]) -> pa.Table:
    """`standardize` of conversations `start` to `stop` of a parquet file, as a dataset held in memory."""
    source, start, stop = task
    batch = read_rows(source, start, stop)
    standardized = standardize(Dataset(InMemoryTable(batch)), STATE["config"]).data.table
    assert standardized.num_rows == batch.num_rows, f"{source}: rows {start}-{stop}, {standardized.num_rows} out"
    return standardized


def standardize_file(
    source: Path, target: Path, config: StandardizeConfig, rows_per_batch: int = ROWS_PER_GROUP, workers: int = 1
) -> int:
    """Standardize the conversations of parquet file `source` into `target`, `rows_per_batch` at a time over
    `workers` processes, written in order as they come; returns how many were written.

    No batch is copied into a cache file and memory-mapped (3x the text of the training rows): the workers' batches
    come back in memory and are written in order as they arrive.
    """
    ranges = [(source, start, stop) for start, stop in row_ranges(source, rows_per_batch)]
    if not ranges:
        raise ValueError(f"{source}: no conversations to standardize")
    written = 0
    writer = None
    try:
        for standardized in run(standardize_rows, ranges, workers, {"config": config}):
            writer = writer or pq.ParquetWriter(target, standardized.schema)
            writer.write_table(standardized)
            written += standardized.num_rows
    finally:
        if writer is not None:
            writer.close()
    return written


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  (imported once, before the workers fork)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per batch and worker would interleave
    config = load(StandardizeConfig, params_path, "standardize")
    log.info("config: %s", asdict(config))

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "eval"):
        source = data / f"{split}.parquet"
        conversations_in = pq.ParquetFile(source).metadata.num_rows
        conversations = standardize_file(source, out / f"{split}.parquet", config, workers=cores())
        counts |= {f"{split}_conversations_in": conversations_in, f"{split}_conversations": conversations}
        log.info("%s: %d conversations -> %s", split, conversations, out / f"{split}.parquet")
    write_json(metrics, counts)


if __name__ == "__main__":
    main(
        **cli.arguments(
            __doc__, data="folder of the ShareGPT conversations", out="folder of the messages", metrics="JSON"
        )
    )
