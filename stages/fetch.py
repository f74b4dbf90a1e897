"""fetch: load Finance-Instruct-500k (or a local file in its schema), check and clean it, hold out evaluation rows.

    python -m stages.fetch --sources data/sample data/source --out data/raw --metrics metrics/fetch.json

Every row's fate is counted: `rows_in = rows_kept + sum(dropped_*)`, checked and written to `metrics/fetch.json`
with where the data came from. Rows are compared with their whitespace normalised (`finetune.data.near_copies`;
the rows written keep their texts). Duplicates are dropped before the held-out draw, and the draw happens before
`to_sharegpt` merges rows into conversations; a training row with the question and answer of a held-out row is
dropped too, and one holding a run of `held_out_ngram` words of a held-out answer: no held-out answer can appear in
training (`finetune.data.cleaning`). `held_out_rows_with_near_copies` says how many held-out rows had such copies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datasets import Dataset

from finetune.config import cli
from finetune.config.params import load, require
from finetune.config.workspace import require_in_copy
from finetune.data.cleaning import BAD_LINE_REASONS, FetchConfig, check_schema, clean_and_split, read_jsonl, write_rows
from finetune.data.files import file_hash, write_json
from finetune.data.sources import LOCAL_FORMATS, check_watched, from_file, from_hub

log = logging.getLogger("fetch")


def load_rows(
    config: FetchConfig, sources: tuple[Path, ...]
) -> tuple[Dataset, dict[str, Any], dict[str, list[int]], list[str]]:
    """The dataset from a local file (by its suffix, in one of `sources`, the folders DVC watches) or the Hub; its
    provenance; the lines of a .jsonl file left out by `fetch.bad_rows: drop`, by reason; the columns not of the
    schema, which are not read."""
    path, none_left_out = Path(config.dataset), {reason: [] for reason in BAD_LINE_REASONS}
    if path.suffix.lower() not in LOCAL_FORMATS:
        require(  # the Hub's loader would read a local folder of any files, unchecked and unhashed
            not path.exists(),
            f"fetch.dataset: {path} is a local {'folder' if path.is_dir() else 'file'}; give a "
            f"{', '.join(LOCAL_FORMATS)} file, or a Hub dataset id",
        )
        dataset, provenance = from_hub(config.dataset, config.split, config.revision)
        return dataset, provenance, none_left_out, check_schema(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"fetch.dataset: no such file: {path}")
    check_watched(path, sources, "fetch.dataset")
    provenance = {"source": str(path), "sha256": file_hash(path, "sha256")}
    if path.suffix.lower() == ".jsonl":  # read line by line: a bad line is named, or left out and counted
        dataset, dropped, other_keys = read_jsonl(path, config.bad_rows)
        return dataset, provenance, dropped, check_schema(dataset, other_keys)
    dataset = from_file(path, text=True)
    return dataset, provenance, none_left_out, check_schema(dataset)


def main(params_path: Path, sources: tuple[Path, ...], out: Path, metrics: Path) -> None:
    config = load(FetchConfig, params_path, "fetch")
    log.info("config: %s", asdict(config))
    require_in_copy(config.dataset, "fetch.dataset", os.environ, Path.cwd())  # a file git lacks, in a DVC copy

    # --- load, in the dataset's schema
    dataset, provenance, bad, ignored = load_rows(config, sources)
    for reason, lines in bad.items():
        if lines:
            log.warning("left out %d lines (%s), the first: %s", len(lines), reason, lines[:10])
    if ignored:
        log.info("ignoring columns not in the schema: %s", ignored)

    # --- clean, draw the held-out rows, keep their questions and answers, and runs of their answers, out of training
    table, train, held_out, counts = clean_and_split(dataset, config, bad)

    # --- outputs: the two splits, every row's fate and the provenance
    out.mkdir(parents=True, exist_ok=True)
    write_rows(table, train, out / "train.parquet")
    write_rows(table, held_out, out / "eval.parquet")
    report = {**counts, "ignored_columns": len(ignored), "train_rows": len(train), "eval_rows": len(held_out)}
    first_lines = {reason: lines[:10] for reason, lines in bad.items() if lines}  # where to look in the file
    write_json(metrics, {**report, "provenance": provenance | ({"dropped_lines": first_lines} if first_lines else {})})
    log.info("wrote %s to %s, metrics to %s", report, out, metrics)


if __name__ == "__main__":
    main(
        **cli.arguments(
            __doc__, ("sources",), sources="folders a local dataset must be in", out="the splits", metrics="JSON"
        )
    )
