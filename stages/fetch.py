"""fetch: load Finance-Instruct-500k (or a local file in its schema), check it, hold out the evaluation rows.

    python -m stages.fetch --out data/raw --metrics metrics/fetch.json

The evaluation split is drawn here, before `to_sharegpt` merges rows into conversations, so no held-out row can
ever appear inside a training conversation.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset, Value, load_dataset

from stages import params
from stages.params import require
from stages.tracking import write_json

log = logging.getLogger("fetch")

TEXT_COLUMNS = ("system", "user", "assistant")
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True)
class FetchConfig:
    dataset: str  # Hub dataset id, or a local .parquet/.jsonl/.json/.csv file in the same schema
    revision: str | None  # Hub commit, tag or branch; null = the default branch
    split: str  # Hub split to load
    eval_size: int  # rows held out for evaluation
    seed: int  # seed of the held-out draw

    def __post_init__(self) -> None:
        require(bool(self.dataset.strip()), "fetch.dataset must not be empty")
        require(self.eval_size >= 1, f"fetch.eval_size must be >= 1, got {self.eval_size}")


def load(config: FetchConfig) -> Dataset:
    """Load the dataset from a local file (by its suffix) or from the Hugging Face Hub."""
    suffix = Path(config.dataset).suffix.lower()
    if suffix in LOCAL_FORMATS:
        path = Path(config.dataset)
        if not path.is_file():
            raise FileNotFoundError(f"fetch.dataset: no such file: {path}")
        return load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    return load_dataset(config.dataset, split=config.split, revision=config.revision)


def check_schema(dataset: Dataset) -> None:
    """Raise naming the column when a text column is missing or not of string type."""
    found = list(dataset.column_names)
    for column in TEXT_COLUMNS:
        if column not in found:
            raise ValueError(f"dataset has no '{column}' column; expected {list(TEXT_COLUMNS)}, found {found}")
        feature = dataset.features[column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"column '{column}' must hold text, found {feature}")


def split(dataset: Dataset, eval_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Draw `eval_size` held-out rows at random (by `seed`); return `(train, eval)`, disjoint by row."""
    if eval_size >= len(dataset):
        raise ValueError(f"fetch.eval_size ({eval_size}) must be smaller than the dataset ({len(dataset)} rows)")
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def main(params_path: Path, out: Path, metrics: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = params.load(FetchConfig, params_path, "fetch")
    log.info("config: %s", asdict(config))

    dataset = load(config)
    check_schema(dataset)
    train, held_out = split(dataset, config.eval_size, config.seed)

    out.mkdir(parents=True, exist_ok=True)
    train.to_parquet(out / "train.parquet")
    held_out.to_parquet(out / "eval.parquet")
    counts = {"rows": len(dataset), "train_rows": len(train), "eval_rows": len(held_out)}
    write_json(metrics, counts)
    log.info("wrote %s to %s, metrics to %s", counts, out, metrics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.out, args.metrics)
