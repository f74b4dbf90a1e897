"""standardize: map ShareGPT turns to role/content messages with unsloth's `standardize_sharegpt`.

    python -m stages.standardize --data data/sharegpt --out data/standardized --metrics metrics/standardize.json

`{"from": "human", "value": ...}` becomes `{"role": "user", "content": ...}` and `gpt` becomes `assistant`,
the form that chat templates and TRL's `SFTTrainer` read.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from stages import params
from stages.files import write_json
from stages.params import require

log = logging.getLogger("standardize")


@dataclass(frozen=True)
class StandardizeConfig:
    aliases_for_system: list[str]  # ShareGPT role names read as "system"
    aliases_for_user: list[str]  # ... as "user"
    aliases_for_assistant: list[str]  # ... as "assistant"

    def __post_init__(self) -> None:
        for role in ("system", "user", "assistant"):
            require(bool(getattr(self, f"aliases_for_{role}")), f"standardize.aliases_for_{role} must not be empty")


def standardize(dataset: Dataset, config: StandardizeConfig) -> Dataset:
    """unsloth's `standardize_sharegpt` with this stage's role aliases, in this process (no worker pool)."""
    from unsloth import standardize_sharegpt

    return standardize_sharegpt(dataset, **asdict(config), num_proc=1)


def standardize_file(source: Path, target: Path, config: StandardizeConfig, rows_per_batch: int = 16384) -> int:
    """Standardize the conversations of parquet file `source` into `target`, `rows_per_batch` at a time; returns
    how many were written.

    Each batch goes through `standardize` as a dataset held in memory, and is written as it comes: neither the
    input nor the output is copied whole into a cache file and memory-mapped (3x the text of the training rows).
    """
    written = 0
    writer = None
    try:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=rows_per_batch):
            standardized = standardize(Dataset(pa.Table.from_batches([batch])), config).data.table
            assert standardized.num_rows == batch.num_rows, f"{source}: {batch.num_rows} in, {standardized.num_rows}"
            writer = writer or pq.ParquetWriter(target, standardized.schema)
            writer.write_table(standardized)
            written += standardized.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"{source}: no conversations to standardize")
    return written


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = params.load(StandardizeConfig, params_path, "standardize")
    log.info("config: %s", asdict(config))

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "eval"):
        source = data / f"{split}.parquet"
        conversations_in = pq.ParquetFile(source).metadata.num_rows
        conversations = standardize_file(source, out / f"{split}.parquet", config)
        counts |= {f"{split}_conversations_in": conversations_in, f"{split}_conversations": conversations}
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
