"""The `tokenize` section, and conversations encoded as the training reads them: token ids, labels on the tokens
learnt, the length of the prompt before the last answer; cut to (or dropped over) `model.max_seq_length`.

    row            the conversation's index in the standardized split
    input_ids      its token ids
    labels         IGNORE_INDEX (-100) except on the tokens learnt (the answers' own, or every one)
    prompt_length  tokens before its last answer: `input_ids[:prompt_length]` is the prompt that answer follows
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from finetune.config.params import require
from finetune.tokens.chat import IGNORE_INDEX, Chat, token_ids

OVER_LENGTH = ("truncate", "drop")
PERCENTILES = (50, 95, 99)
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
    is learnt; with `over_length: drop` it is dropped. One left with no token of an answer is dropped either way
    (with `train_on_responses_only: false` too, where its question's tokens would be learnt).
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
    # an answer's token inside the cut: learnt where train_on_responses_only, and what evaluate scores either way
    answered = np.add.reduceat(np.repeat(layout.answer, piece_tokens) & in_cut, start) if n else np.empty(0, np.int64)
    unlearnable = kept & (answered == 0)
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
