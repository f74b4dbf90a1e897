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
process may run on, in shards of `SHARD_ROWS` conversations; the output depends on neither. Each training row is a
turn of several merged conversations, so each distinct piece of text is tokenized once (about half of them on
Finance-Instruct) and the conversations assembled from those ids.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import params
from stages.chat import IGNORE_INDEX, PROBE, PROBE_FILE, Chat, ChatConfig, token_ids
from stages.files import digests, distinct, write_json
from stages.model import ModelConfig, load_tokenizer
from stages.params import require
from stages.workers import STATE, cores, read_rows, row_ranges, run

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


def split(chat: Chat, conversations: list[list[dict[str, str]]], verbatim: bool) -> list[list[tuple[str, bool]]]:
    """Each conversation's (text, is_answer) pieces: filled into its roles' template layout (`Chat.fast_pieces`), or,
    not `verbatim`, rendered through the template itself (`Chat.pieces`)."""
    return [(chat.fast_pieces if verbatim else chat.pieces)(messages) for messages in conversations]


def encode(
    chat: Chat,
    conversations: list[list[dict[str, str]]],
    rows: np.ndarray,
    max_length: int,
    config: TokenizeConfig,
    verbatim: bool = True,
) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """Encode conversations (their indices in the split: `rows`) into a table of `SCHEMA`; also every
    conversation's length before the cut, and the counts of those cut or dropped, by reason (see `assemble`).

    Every piece is tokenized here; the stage tokenizes each distinct piece once (`tokenize_split`), to the same table.
    """
    pieces = split(chat, conversations, verbatim)
    ids = token_ids(chat.tokenizer, [text for conversation in pieces for text, _ in conversation])
    piece_tokens = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(piece_tokens.sum()))
    return assemble(Layout.of(pieces, rows), piece_tokens, flat, max_length, config)


@dataclass(frozen=True)
class Layout:
    """Where the pieces of a run of conversations are, without their text: what `assemble` needs besides the ids."""

    rows: np.ndarray  # each conversation's index in its split
    pieces: np.ndarray  # how many pieces each conversation has
    answer: np.ndarray  # per piece: whether it is an answer's own text (learnt under answer-only labels)

    @classmethod
    def of(cls, pieces: list[list[tuple[str, bool]]], rows: np.ndarray) -> Layout:
        count = sum(map(len, pieces))
        answer = np.fromiter((a for conversation in pieces for _, a in conversation), bool, count=count)
        return cls(rows, np.fromiter(map(len, pieces), np.int64, count=len(pieces)), answer)


def assemble(
    layout: Layout, piece_tokens: np.ndarray, flat: np.ndarray, max_length: int, config: TokenizeConfig
) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """The table of conversations whose pieces hold `piece_tokens` tokens each, `flat` all of them in order; each
    conversation's length before the cut; and the counts of those cut or dropped, by reason.

    A one-turn conversation of 12 tokens, 5 of them the answer's, with `max_length` 8 is cut to 8 tokens of which 1
    is learnt; with `over_length: drop` it is dropped. One left with no learnt token is dropped either way.
    """
    rows, n = layout.rows, len(layout.rows)
    learnt_piece = layout.answer if config.train_on_responses_only else np.ones(len(piece_tokens), bool)
    labels = np.where(np.repeat(learnt_piece, piece_tokens), flat, np.int32(IGNORE_INDEX)).astype(np.int32)

    # per conversation: its last answer piece (one it must have), its first piece and token, its length
    first_piece = np.cumsum(layout.pieces) - layout.pieces
    answers = np.flatnonzero(layout.answer)
    before_end = np.searchsorted(answers, first_piece + layout.pieces)  # answer pieces up to each one's end
    last_answer = answers[before_end - 1] if len(answers) else np.full(n, -1)
    missing = (before_end == 0) | (last_answer < first_piece)
    if missing.any():
        raise ValueError(f"conversation {rows[np.argmax(missing)]}: no assistant turn, nothing to learn or score")
    piece_start = np.cumsum(piece_tokens) - piece_tokens
    start = piece_start[first_piece]
    full = np.add.reduceat(piece_tokens, first_piece) if n else np.empty(0, np.int64)
    prompt_length = piece_start[last_answer] - start

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


@dataclass(frozen=True)
class Shard:
    source: Path
    start: int
    stop: int
    verbatim: bool  # fill layouts (`Chat.fast_pieces`) rather than render each conversation

    def conversations(self) -> list[list[dict[str, str]]]:
        return read_rows(self.source, self.start, self.stop, ["conversations"]).column(0).to_pylist()


def survey(shard: Shard) -> tuple[Layout, np.ndarray] | None:
    """Phase one: the layout of a shard's pieces and each piece's digest; None where the layout did not hold.

    Where the layout is used, `CHECKED_PER_SHARD` conversations are also rendered through the template itself; a
    difference means the template does not pass contents through verbatim, and the stage starts over without it.
    """
    chat = STATE["chat"]
    conversations = shard.conversations()
    if shard.verbatim:
        checked = np.unique(np.linspace(0, len(conversations) - 1, CHECKED_PER_SHARD, dtype=np.int64))
        if any(chat.fast_pieces(conversations[i]) != chat.pieces(conversations[i]) for i in checked):
            return None
    pieces = split(chat, conversations, shard.verbatim)
    layout = Layout.of(pieces, np.arange(shard.start, shard.stop, dtype=np.int64))
    return layout, digests([text for conversation in pieces for text, _ in conversation])


def encode_distinct(task: tuple[Shard, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Phase two: the token ids of the pieces of a shard at `wanted` (those whose text occurs there first), as their
    lengths and their ids end to end. The shard is read and split again rather than its texts kept from phase one:
    kept, every shard's texts would be the whole split in memory; reading and splitting cost ~6 % of encoding
    (8,192 conversations: 1.3 s against 21 s)."""
    shard, wanted = task
    pieces = split(STATE["chat"], shard.conversations(), shard.verbatim)
    texts = [text for conversation in pieces for text, _ in conversation]
    ids = token_ids(STATE["chat"].tokenizer, [texts[i] for i in wanted.tolist()])
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    return lengths, np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))


def assemble_shard(task: tuple[Layout, np.ndarray, Path]) -> tuple[np.ndarray, dict[str, int]]:
    """Phase three: a shard's conversations from the ids of the texts its pieces are (`numbers`), into its part file;
    its full lengths and counts."""
    layout, numbers, part = task
    piece_tokens = STATE["lengths"][numbers]
    into = np.repeat(STATE["offsets"][numbers] - (np.cumsum(piece_tokens) - piece_tokens), piece_tokens)
    flat = STATE["ids"][into + np.arange(len(into))]
    table, full, counts = assemble(layout, piece_tokens, flat, STATE["max_length"], STATE["config"])
    with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)
    return full, counts


def tokenize_split(
    source: Path, target: Path, chat: Chat, max_length: int, config: TokenizeConfig, workers: int
) -> dict[str, int]:
    """Encode every conversation of `source` into the Arrow file `target`; its counts and length statistics.

    Each training row is a turn of several merged conversations (`to_sharegpt.conversation_extension`), so the same
    texts recur: the shards are surveyed (pieces and digests), each distinct piece tokenized once, where it first
    occurs, and the conversations assembled from those ids, to the table `encode` makes of them.
    """
    total = pq.ParquetFile(source).metadata.num_rows
    require(total > 0, f"{source}: no conversations to tokenize")
    parts = target.with_suffix(".parts")
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    state: dict[str, Any] = {"chat": chat}
    for verbatim in (True, False):
        shards = [Shard(source, start, stop, verbatim) for start, stop in row_ranges(source, SHARD_ROWS)]
        surveys = list(run(survey, shards, workers, state))
        if all(found is not None for found in surveys):
            break
        log.warning("the chat template does not pass contents through verbatim: rendering every conversation")
    pieces = np.cumsum([0] + [len(keys) for _, keys in surveys])
    numbers, first = distinct(np.concatenate([keys for _, keys in surveys]))
    log.info("%s: %d pieces, %d distinct texts tokenized", source.name, len(numbers), len(first))

    bounds = np.searchsorted(first, pieces)  # `first` is sorted: each shard's first occurrences are a run of it
    wanted = [first[lo:hi] - a for a, lo, hi in zip(pieces[:-1], bounds[:-1], bounds[1:], strict=True)]
    store, lengths = parts / "distinct.ids", []
    with store.open("wb") as sink:
        for piece_lengths, ids in run(encode_distinct, list(zip(shards, wanted, strict=True)), workers, state):
            ids.tofile(sink)
            lengths.append(piece_lengths)
    log.info("%s: %d tokens in the distinct texts", source.name, store.stat().st_size // 4)
    state |= {"max_length": max_length, "config": config, "lengths": np.concatenate(lengths)}
    state |= {
        "offsets": np.cumsum(state["lengths"]) - state["lengths"],
        "ids": np.memmap(store, np.int32, mode="r") if store.stat().st_size else np.empty(0, np.int32),
    }
    tasks = [
        (layout, numbers[a:b], parts / f"{shard.start:012d}.arrow")
        for (layout, _), shard, a, b in zip(surveys, shards, pieces[:-1], pieces[1:], strict=True)
    ]
    results = list(run(assemble_shard, tasks, workers, state))
    counts = {key: sum(c[key] for _, c in results) for key in results[0][1]}
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for _, _, part in tasks:
            with pa.memory_map(str(part)) as mapped:
                for batch in pa.ipc.open_stream(mapped):
                    writer.write_batch(batch)
    shutil.rmtree(parts)
    return counts | summary(np.concatenate([full for full, _ in results]), max_length)


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
