"""benchmarks: the benchmarks evaluate scores, loaded from the Hub or a local folder, their label values mapped to
the label words (label sets) or their reference answers read as numbers (numeric benchmarks), each item checked
against the training conversations for contamination.

    python -m stages.benchmarks --sources data/benchmarks --texts data/standardized --out data/benchmark_items \
        --metrics metrics/benchmarks.json

Each entry of `benchmarks.sets` names a preset (`finetune.evaluation.benchmark_sets.PRESETS`: Financial PhraseBank,
FiQA sentiment, Twitter Financial News sentiment, with their Hub ids, columns and published label maps; FinQA),
any field of which it may override (a local folder in the same schema as `dataset`, say), or gives every field
itself. Written: `<name>.jsonl` per benchmark (text, label word or reference answer, and whether the item was found
in the training messages whole, `exact`, or by an n-gram, `ngram`: `finetune.evaluation.contamination`) and
`benchmarks.json` (each one's kind, labels, instruction, and where its rows came from: the Hub commit, or each
local file's SHA-256; the numeric benchmarks' `max_new_tokens` and `rel_tolerance`), which evaluate reads. A
changed benchmark reruns this stage and evaluate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from finetune.config import cli
from finetune.config.params import flatten, load, require
from finetune.data.files import BENCHMARK_MANIFEST, write_json
from finetune.data.parallel import cores
from finetune.data.sources import LOCAL_FORMATS, REREAD, check_watched, from_file, from_hub, local_provenance
from finetune.evaluation.benchmark_sets import BenchmarkConfig, BenchmarksConfig, benchmark_rows
from finetune.evaluation.contamination import Index, contamination, training_messages, without_shared_ends

log = logging.getLogger("benchmarks")


def load_set(bench: BenchmarkConfig, key: str, sources: tuple[Path, ...]) -> tuple[Any, dict[str, Any]]:
    """The split of a Hub dataset, or of a local folder or file in the same schema (a folder through the same
    `load_dataset` call as the Hub), with where it came from: the Hub commit, or each local file's SHA-256."""
    from datasets import load_dataset

    path = Path(bench.dataset)
    if not path.exists() and (bench.dataset.count("/") != 1 or path.suffix.lower() in LOCAL_FORMATS):
        raise FileNotFoundError(f"{key}.dataset: no such file or folder {path}, and no Hub id (owner/name)")
    if not path.exists():
        return from_hub(bench.dataset, bench.split, bench.revision, name=bench.config, data_dir=bench.data_dir)
    check_watched(path, sources, f"{key}.dataset")
    require(bench.revision is None, f"{key}.revision applies to Hub datasets; set it to null for the local {path}")
    if path.is_file():
        require(
            path.suffix.lower() in LOCAL_FORMATS, f"{key}.dataset: {path} must be one of {', '.join(LOCAL_FORMATS)}"
        )
        return from_file(path), local_provenance(path)
    dataset = load_dataset(
        str(path), name=bench.config, data_dir=bench.data_dir, split=bench.split, download_mode=REREAD
    )
    return dataset, local_provenance(path)


def main(params_path: Path, sources: tuple[Path, ...], texts: Path, out: Path, metrics: Path) -> None:
    config = load(BenchmarksConfig, params_path, "benchmarks")
    log.info("config: %s", flatten("benchmarks", config))

    # --- load each benchmark and map its labels to the label words
    loaded = []
    for i, bench in enumerate(config.sets):
        dataset, provenance = load_set(bench, f"benchmarks.sets[{i}]", sources)
        loaded.append((bench, benchmark_rows(bench, dataset, f"benchmarks.sets[{i}]"), provenance))
        log.info("%s: %d rows from %s", bench.name, len(loaded[-1][1]), provenance)

    # --- contamination: every item, less its benchmark's template, against every distinct training message
    start = time.perf_counter()
    messages = training_messages(texts / "train.parquet")
    every = [text for _, rows, _ in loaded for text in without_shared_ends([row["text"] for row in rows])]
    flags = contamination(Index(every, config.ngram), messages, cores()) if every else {}
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {"training_messages": len(messages), "contamination_seconds": seconds, "provenance": {}}

    # --- outputs: one file per benchmark, the manifest evaluate reads, the metrics
    out.mkdir(parents=True, exist_ok=True)
    manifest, first = [], 0
    for bench, rows, provenance in loaded:
        exact, ngram = flags["exact"][first : first + len(rows)], flags["ngram"][first : first + len(rows)]
        first += len(rows)
        with (out / f"{bench.name}.jsonl").open("w", encoding="utf-8") as f:
            for row, e, n in zip(rows, exact, ngram, strict=True):
                f.write(json.dumps({**row, "exact": bool(e), "ngram": bool(n)}, ensure_ascii=False) + "\n")
        manifest.append(
            {
                "name": bench.name,
                "kind": bench.kind,
                "labels": bench.labels,
                "instruction": bench.instruction,
                "provenance": provenance,
            }
        )
        contaminated = int((exact | ngram).sum())
        results |= {
            f"{bench.name}_rows": len(rows),
            f"{bench.name}_contaminated_exact": int(exact.sum()),
            f"{bench.name}_contaminated_ngram": int(ngram.sum()),
            f"{bench.name}_contaminated": contaminated,
            f"{bench.name}_contaminated_share": contaminated / len(rows),
        }
        results["provenance"][bench.name] = provenance
    generation = {"max_new_tokens": config.max_new_tokens, "rel_tolerance": config.rel_tolerance}  # numeric sets'
    write_json(out / BENCHMARK_MANIFEST, {"benchmarks": manifest, "ngram": config.ngram, **generation})
    write_json(metrics, results)
    log.info("%d benchmarks -> %s, metrics -> %s: %s", len(manifest), out, metrics, results)


if __name__ == "__main__":
    paths = cli.arguments(
        __doc__,
        ("sources",),
        sources="folders of local benchmark files",
        texts="folder of the standardized conversations",
        out="folder of the benchmark items",
        metrics="JSON",
    )
    main(**paths)
