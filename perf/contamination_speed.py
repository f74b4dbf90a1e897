"""Benchmark: the benchmarks stage's contamination check, 518,185 training conversations x 2,400 benchmark items.

    python -m perf.contamination_speed [--params params.yaml] [--train data/standardized/train.parquet] [--items 2400]
        [--processes 2]

The training side is the standardized stage's `train.parquet` (`--train`; by default one generated in `--work` with
`perf.data_stages.make_rows`' length mix, each conversation three rows, as to_sharegpt merges them: ~2.4 GB of
message text, ~0.8 GB distinct). The benchmark side: `--items` sentences of 5 to 40 words from the same vocabulary
(every word known, the hashing's worst case), 4 % of them cut whole out of a training message and 4 % sharing 13
words with one (`benchmarks.ngram` of `--params`, or `--ngram`). Times the stage's own functions
(`finetune.evaluation.contamination`): reading the messages and keeping the distinct ones, indexing the items, the
search on `--processes` processes (default: the cores the stage would use); checks that every planted item is found
and prints a table under the settings it ran.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from finetune.config.params import load
from finetune.data.parallel import cores
from finetune.evaluation.benchmark_sets import BenchmarksConfig
from finetune.evaluation.contamination import Index, contamination, training_messages, without_shared_ends
from perf.data_stages import make_rows, text


def generate_training(path: Path, conversations: int, seed: int) -> None:
    """`conversations` conversations of three generated rows each, in the standardized stage's schema."""
    rows = make_rows(conversations, seed)
    turns = [
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        for user, answer in zip(rows["user"], rows["assistant"], strict=True)
    ]
    rng = random.Random(seed)
    orders = [list(range(conversations)) for _ in range(3)]
    for order in orders[1:]:
        rng.shuffle(order)
    merged = [turns[a] + turns[b] + turns[c] for a, b, c in zip(*orders, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"conversations": merged}), path, row_group_size=32768)


def benchmark_items(messages: pa.Array, count: int, ngram: int, seed: int) -> tuple[list[str], list[int], list[int]]:
    """`count` items and the positions of those planted whole and by `ngram` words."""
    rng = random.Random(seed)
    items = [text(rng, rng.randint(30, 260)) for _ in range(count)]
    whole, gram = rng.sample(range(count), 2 * count // 25), []
    whole, gram = whole[: len(whole) // 2], whole[len(whole) // 2 :]
    for i in whole + gram:
        while len(words := (messages[rng.randrange(len(messages))].as_py() or "").split()) < max(40, ngram + 10):
            continue
        start = rng.randrange(len(words) - max(30, ngram))
        if i in whole:  # a span of a message, cased and spaced otherwise
            items[i] = " ".join(words[start : start + rng.randint(6, 30)]).upper()
        else:  # `ngram` words of a message between words of its own
            items[i] = f"{text(rng, 30)} {' '.join(words[start : start + ngram])} {text(rng, 30)}"
    return items, whole, gram


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file, as the stage reads")
    parser.add_argument("--train", type=Path, help="a standardized train.parquet; default: generated in --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-contamination"))
    parser.add_argument("--conversations", type=int, default=518185)
    parser.add_argument("--items", type=int, default=2400)
    parser.add_argument("--ngram", type=int, help="words of an n-gram; default: benchmarks.ngram of --params")
    parser.add_argument("--processes", type=int, default=cores(), help="search processes; default: the stage's")
    args = parser.parse_args(argv)
    ngram = args.ngram or load(BenchmarksConfig, args.params, "benchmarks").ngram
    train = args.train or args.work / "train.parquet"
    if not train.is_file():
        print(f"generating {args.conversations} conversations into {train} (untimed) ...", flush=True)
        generate_training(train, args.conversations, seed=0)

    timings = {}
    start = time.perf_counter()
    messages = training_messages(train)
    timings["read, distinct messages"] = time.perf_counter() - start
    items, whole, gram = benchmark_items(messages, args.items, ngram, seed=1)
    start = time.perf_counter()
    index = Index(without_shared_ends(items), ngram)  # as the stage indexes them: less a shared template
    timings["index the items"] = time.perf_counter() - start
    start = time.perf_counter()
    found = contamination(index, messages, args.processes)
    timings[f"search ({args.processes} processes)"] = time.perf_counter() - start
    timings["total"] = sum(timings.values())

    conversations = pq.ParquetFile(train).metadata.num_rows
    size = f"{len(messages):,} distinct messages ({messages.nbytes / 1e9:.2f} GB)"
    print(
        f"\n{conversations:,} conversations of {train}, {size}; {len(items):,} items, planted: {len(whole)} whole, "
        f"{len(gram)} by {ngram} words; benchmarks.ngram {ngram}, {args.processes} processes"
    )
    print("\n| step | seconds |\n|---|---|")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.1f} |")
    exact, by_ngram = found["exact"], found["ngram"]
    either = int((exact | by_ngram).sum())
    print(f"\nfound whole: {int(exact.sum())}, by an n-gram: {int(by_ngram.sum())}, either: {either}")
    print(f"planted whole found whole: {int(exact[whole].sum())}/{len(whole)}")
    print(f"planted {ngram} words found by the n-gram: {int(by_ngram[gram].sum())}/{len(gram)}")
    assert exact[whole].all() and by_ngram[gram].all(), "a planted item was not found"


if __name__ == "__main__":
    main()
