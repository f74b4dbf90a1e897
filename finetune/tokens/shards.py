"""A split tokenized over the worker processes, each distinct piece of text once (`tokenize_split`).

Each training row is a turn of several merged conversations (`to_sharegpt.conversation_extension`), so the same
texts recur (about half of them on Finance-Instruct): the shards are surveyed (pieces and digests), each distinct
piece tokenized once, where it first occurs, and the conversations assembled from those ids, to the table
`finetune.tokens.encode.encode` makes of them. The output depends on neither the number of workers nor their timing.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finetune.config.params import require
from finetune.data.files import digests, distinct
from finetune.data.parallel import STATE, read_rows, row_ranges, run
from finetune.tokens.chat import Chat, token_ids
from finetune.tokens.encode import SCHEMA, Layout, TokenizeConfig, assemble, split, summary

log = logging.getLogger(__name__)

SHARD_ROWS = 2048  # conversations a worker encodes at a time: ~100 MB of Python ids at the real data's lengths
CHECKED_PER_SHARD = 4  # conversations of each shard also rendered through the template itself, to check the layout


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
