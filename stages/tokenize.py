"""tokenize: the token ids and labels of every training and held-out conversation, once, for train and evaluate.

    python -m stages.tokenize --data data/standardized --out data/tokenized --metrics metrics/tokenize.json

Each conversation is encoded by `stages.chat` (the chat template, the think block, answer-only labels), cut to or
dropped over `model.max_seq_length` tokens, and written to `<out>/<split>.arrow` (Arrow IPC, the format `datasets`
memory-maps: train and evaluate open it without a copy, every rank of a multi-GPU run the same file):

    row            the conversation's index in the standardized split
    input_ids      its token ids
    labels         IGNORE_INDEX (-100) except on the tokens learnt (the answers' own, or every one)
    prompt_length  tokens before its last answer: `input_ids[:prompt_length]` is the prompt that answer follows

and `<out>/chat_probe.json`, the ids of `stages.chat.PROBE`, by which train checks that the model's own tokenizer
encodes as this stage did.

`metrics/tokenize.json` holds each split's length statistics before the cut (p50/p95/p99/max, total, how many
exceed the limit) and every conversation cut or dropped, counted by reason. The work is spread over every core this
process may run on, in shards of `SHARD_ROWS` conversations; the output depends on neither.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import params
from stages.chat import IGNORE_INDEX, PROBE, PROBE_FILE, Chat, ChatConfig, token_ids
from stages.files import write_json
from stages.model import ModelConfig, load_tokenizer
from stages.params import require

log = logging.getLogger("tokenize")

OVER_LENGTH = ("truncate", "drop")
PERCENTILES = (50, 95, 99)
SHARD_ROWS = 2048  # conversations a worker encodes at a time: ~100 MB of Python ids at the real data's lengths
CHECKED_PER_SHARD = 4  # conversations of each shard also rendered through the template itself, to check the layout
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("prompt_length", pa.int32()),
    ]
)


@dataclass(frozen=True)
class TokenizeConfig:
    train_on_responses_only: bool = True  # labels on the answers' own tokens only; false = on every token
    over_length: str = "truncate"  # a conversation over model.max_seq_length tokens: truncate (cut) or drop

    def __post_init__(self) -> None:
        require(
            self.over_length in OVER_LENGTH,
            f"tokenize.over_length must be one of {OVER_LENGTH}, got {self.over_length!r}",
        )


def encode(
    chat: Chat,
    conversations: list[list[dict[str, str]]],
    rows: np.ndarray,
    max_length: int,
    config: TokenizeConfig,
    verbatim: bool = True,
) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """Encode conversations (their indices in the split: `rows`) into a table of `SCHEMA`; also every
    conversation's length before the cut, and the counts of those cut or dropped, by reason.

    `verbatim` fills each conversation into its roles' template layout (`Chat.fast_pieces`); false renders each
    through the template itself (`Chat.pieces`). A one-turn conversation of 12 tokens, 5 of them the answer's, with
    `max_length` 8 is cut to 8 tokens of which 1 is learnt; with `over_length: drop` it is dropped.
    """
    split = [(chat.fast_pieces if verbatim else chat.pieces)(messages) for messages in conversations]
    ids = token_ids(chat.tokenizer, [text for pieces in split for text, _ in pieces])
    n = len(split)
    pieces_per = np.fromiter(map(len, split), np.int64, count=n)
    piece_tokens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(piece_tokens.sum()))
    learnt_piece = np.fromiter((is_answer for pieces in split for _, is_answer in pieces), bool, count=len(ids))
    if not config.train_on_responses_only:
        learnt_piece[:] = True
    labels = np.where(np.repeat(learnt_piece, piece_tokens), flat, np.int32(IGNORE_INDEX)).astype(np.int32)

    # per conversation: its first piece and token, its length, and where its last answer starts
    first_piece = np.concatenate([[0], np.cumsum(pieces_per)[:-1]]).astype(np.int64)
    piece_start = np.concatenate([[0], np.cumsum(piece_tokens)[:-1]]).astype(np.int64)
    start = piece_start[first_piece] if n else np.empty(0, np.int64)
    full = np.add.reduceat(piece_tokens, first_piece) if n else np.empty(0, np.int64)
    last_answer = []
    for row, first, pieces in zip(rows.tolist(), first_piece.tolist(), split, strict=True):
        answers = [i for i, (_, is_answer) in enumerate(pieces) if is_answer]
        require(bool(answers), f"conversation {row}: no assistant turn, nothing to learn or score")
        last_answer.append(first + answers[-1])
    prompt_length = piece_start[last_answer] - start if n else np.empty(0, np.int64)

    # the cut (or the drop), then conversations left with nothing to learn
    over = full > max_length
    kept = ~over if config.over_length == "drop" else np.ones(n, bool)
    position = np.arange(len(flat)) - np.repeat(start, full)
    in_cut = position < max_length
    learnt = np.add.reduceat((labels != IGNORE_INDEX) & in_cut, start) if n else np.empty(0, np.int64)
    unlearnable = kept & (learnt == 0)
    kept &= ~unlearnable
    take = in_cut & np.repeat(kept, full)
    lengths = np.minimum(full, max_length)[kept]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    table = pa.table(
        {
            "row": pa.array(rows[kept], pa.int64()),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat[take])),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels[take])),
            "prompt_length": pa.array(prompt_length[kept].astype(np.int32)),
        },
        schema=SCHEMA,
    )
    counts = {
        "conversations_in": n,
        "conversations": int(kept.sum()),
        "cut_over_length": int((over & kept).sum()),
        "dropped_over_length": int((over & ~unlearnable & ~kept).sum()),
        "dropped_no_answer_token": int(unlearnable.sum()),
        "tokens": int(lengths.sum()),
        "learnt_tokens": int(((labels != IGNORE_INDEX) & take).sum()),
    }
    assert (
        counts["conversations_in"]
        == counts["conversations"] + counts["dropped_over_length"] + counts["dropped_no_answer_token"]
    ), f"conversation accounting does not add up: {counts}"
    return table, full, counts


def tokenized(
    chat: Chat, conversations: list[list[dict[str, str]]], max_length: int, config: TokenizeConfig | None = None
) -> Any:
    """`encode` of conversations held in memory, as the `datasets.Dataset` train reads from the stage's file."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    rows = np.arange(len(conversations), dtype=np.int64)
    table, _, _ = encode(chat, conversations, rows, max_length, config or TokenizeConfig())
    return Dataset(InMemoryTable(table))


def summary(lengths: np.ndarray, limit: int) -> dict[str, int]:
    """p50/p95/p99/max/total of `lengths` and how many exceed `limit`: `tokens_p50`, ..., `tokens_over_limit`."""
    if len(lengths) == 0:
        return {"tokens_over_max_seq_length": 0}
    stats = {f"tokens_p{p}": int(np.percentile(lengths, p, method="higher")) for p in PERCENTILES}
    return stats | {
        "tokens_max": int(lengths.max()),
        "tokens_total": int(lengths.sum()),
        "tokens_over_max_seq_length": int((lengths > limit).sum()),
    }


def read_rows(source: Path, start: int, stop: int) -> list[list[dict[str, str]]]:
    """Conversations `start` to `stop` of a standardized parquet file, reading only the row groups that hold them."""
    file = pq.ParquetFile(source)
    bounds = np.cumsum([0] + [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
    groups = [i for i in range(file.num_row_groups) if bounds[i] < stop and bounds[i + 1] > start]
    table = file.read_row_groups(groups, columns=["conversations"])
    return table.column("conversations").slice(start - int(bounds[groups[0]]), stop - start).to_pylist()


@dataclass(frozen=True)
class Shard:
    source: Path
    start: int
    stop: int
    part: Path  # where the worker writes its table
    verbatim: bool  # fill layouts (`Chat.fast_pieces`) rather than render each conversation


_WORKER: dict[str, Any] = {}  # the chat and settings of a worker process, set once by `_init`


def _init(chat: Chat, max_length: int, config: TokenizeConfig) -> None:
    _WORKER.update(chat=chat, max_length=max_length, config=config)


def encode_shard(shard: Shard) -> tuple[np.ndarray, dict[str, int], bool]:
    """Encode one shard into its part file; its full lengths, its counts, and whether the layout held.

    Where the layout was used, `CHECKED_PER_SHARD` conversations are also rendered through the template itself;
    a difference means the template does not pass contents through verbatim, and the stage starts over without it.
    """
    chat, max_length, config = _WORKER["chat"], _WORKER["max_length"], _WORKER["config"]
    conversations = read_rows(shard.source, shard.start, shard.stop)
    if shard.verbatim:
        checked = np.unique(np.linspace(0, len(conversations) - 1, CHECKED_PER_SHARD, dtype=np.int64))
        if any(chat.fast_pieces(conversations[i]) != chat.pieces(conversations[i]) for i in checked):
            return np.empty(0, np.int64), {}, False
    rows = np.arange(shard.start, shard.stop, dtype=np.int64)
    table, full, counts = encode(chat, conversations, rows, max_length, config, shard.verbatim)
    with pa.OSFile(str(shard.part), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)
    return full, counts, True


def run_shards(shards: list[Shard], workers: int, chat: Chat, max_length: int, config: TokenizeConfig) -> Iterator:
    """`encode_shard` of each shard, in order, over `workers` processes (forked: the tokenizer is not reloaded)."""
    if workers == 1:
        _init(chat, max_length, config)
        yield from map(encode_shard, shards)
        return
    with multiprocessing.get_context("fork").Pool(workers, _init, (chat, max_length, config)) as pool:
        yield from pool.imap(encode_shard, shards)


def tokenize_split(
    source: Path, target: Path, chat: Chat, max_length: int, config: TokenizeConfig, workers: int
) -> dict[str, int]:
    """Encode every conversation of `source` into the Arrow file `target`; its counts and length statistics."""
    total = pq.ParquetFile(source).metadata.num_rows
    require(total > 0, f"{source}: no conversations to tokenize")
    parts = target.with_suffix(".parts")
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    for verbatim in (True, False):
        shards = [
            Shard(source, start, min(start + SHARD_ROWS, total), parts / f"{start:012d}.arrow", verbatim)
            for start in range(0, total, SHARD_ROWS)
        ]
        results = list(run_shards(shards, min(workers, len(shards)), chat, max_length, config))
        if all(held for _, _, held in results):
            break
        log.warning("the chat template does not pass contents through verbatim: rendering every conversation")
    counts = {key: sum(c[key] for _, c, _ in results) for key in results[0][1]}
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for shard in shards:
            with pa.memory_map(str(shard.part)) as part:
                for batch in pa.ipc.open_stream(part):
                    writer.write_batch(batch)
    shutil.rmtree(parts)
    return counts | summary(np.concatenate([full for full, _, _ in results]), max_length)


def cores() -> int:
    """The cores this process may run on (its affinity mask: `taskset` or a container's cpuset)."""
    return len(os.sched_getaffinity(0))


def main(params_path: Path, data: Path, out: Path, metrics: Path) -> None:
    # one thread per worker process, the processes on every core. Workers on the Rust tokenizer's threads too ran the
    # full data 6 % faster on 2 cores (561.7 s against 599.4 s) but peaked at 11.8 GB against 1.15 GB; and a worker
    # forked after the parent started those threads would deadlock.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = params.load(TokenizeConfig, params_path, "tokenize")
    model_config = params.load(ModelConfig, params_path, "model")
    chat_config = params.load(ChatConfig, params_path, "chat")
    settings = {
        **params.flatten("tokenize", config),
        "model.model_name": model_config.model_name,
        "model.revision": model_config.revision,
        "model.max_seq_length": model_config.max_seq_length,
        **params.flatten("chat", chat_config),
    }
    log.info("config: %s", settings)
    chat = Chat(load_tokenizer(model_config), chat_config)
    chat.check(padding=False)  # the pad token is train's and evaluate's concern: they pad

    workers = cores()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, int] = {}
    for split in ("train", "eval"):
        counts = tokenize_split(
            data / f"{split}.parquet", out / f"{split}.arrow", chat, model_config.max_seq_length, config, workers
        )
        require(
            counts["conversations"] > 0,
            f"{split}: every conversation was dropped ({counts}): raise model.max_seq_length, or set "
            "tokenize.over_length: truncate if it is drop",
        )
        report |= {f"{split}_{key}": value for key, value in counts.items()}
        log.info("%s: %s -> %s", split, counts, out / f"{split}.arrow")
    write_json(out / PROBE_FILE, {"input_ids": chat.encode(PROBE)[0]})  # train checks its tokenizer against it
    write_json(metrics, report)
    log.info("%d worker processes; metrics -> %s", workers, metrics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    main(args.params, args.data, args.out, args.metrics)
