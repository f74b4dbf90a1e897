"""Token lengths of conversations as training encodes them (`stages.chat`: template, think block, pieces).

Tokenizing 518k merged conversations one by one would read every row three times. A chat template renders a
conversation as a prefix (BOS) followed by its turns, each turn rendered on its own, and the tokenizer splits the
text at special tokens and at the pieces' cuts before it encodes, so a conversation's length is the sum of its
rows' single-turn lengths less the prefix they repeat: each row is rendered and tokenized once. `check_additive`
holds that sum to the direct count on a sample, and the direct count is used where a template is not built that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.chat import Chat, answer_text

PERCENTILES = (50, 95, 99)


def messages(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def count_tokens(tokenizer: Any, rendered: list[str]) -> np.ndarray:
    """Token counts of rendered texts; the template already wrote BOS, so none is added again."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core: no Python lists of ids
    if backend is None:
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(rendered))
    encodings = backend.encode_batch_fast(rendered, add_special_tokens=False)
    return np.fromiter(map(len, encodings), dtype=np.int64, count=len(rendered))


def encoded_lengths(chat: Chat, conversations: list[list[dict[str, str]]]) -> np.ndarray:
    """Tokens of each conversation as `chat.encode` writes them, counted without building Python id lists."""
    split = [chat.pieces(conversation) for conversation in conversations]
    if not split:
        return np.empty(0, dtype=np.int64)
    per_piece = count_tokens(chat.tokenizer, [text for pieces in split for text, _ in pieces])
    starts = np.cumsum([0] + [len(pieces) for pieces in split[:-1]])
    return np.add.reduceat(per_piece, starts)


def prefix_tokens(chat: Chat) -> int:
    """Tokens a rendering holds before its first turn: one turn's rendering less what a second turn adds."""
    one = messages("What is a bond?", "A loan to an issuer.")
    single, double = encoded_lengths(chat, [one, one + one])
    return int(2 * single - double)


def row_layout(chat: Chat) -> tuple[str, str, str] | None:
    """How the chat lays out a one-turn conversation, as `(head, middle, tail)`: its pieces are the prompt
    `head + question + middle` and the answer `answer_text(answer)[1] + tail`. None where the template does not pass
    the question through verbatim (it trims it, say); then every row is rendered through the template.
    """
    question, answer = " \n\ue010\n ", "\ue011"  # spaces and newlines around: a template that trims shows here
    pieces = chat.pieces(messages(question, answer))
    if len(pieces) != 2:  # text after the answer's end-of-turn (a newline, say): render row by row
        return None
    (prompt, _), (answered, _) = pieces
    written = answer_text(answer, chat.think)[1]
    if prompt.count(question) != 1 or not answered.startswith(written):
        return None
    head, middle = prompt.split(question)
    return head, middle, answered[len(written) :]


def row_lengths(chat: Chat, turns: Any, batch: int = 2048) -> np.ndarray:
    """Tokens of each row rendered alone; `turns` alternates each row's user and assistant text.

    The template is rendered once (`row_layout`) and each row's pieces are joined as strings, not rendered one by
    one: the same text (on 20,000 generated rows, 5.5 s instead of 11.1 s with the tokenizing).
    """
    layout = row_layout(chat)
    out = np.empty(len(turns) // 2, dtype=np.int64)
    for start in range(0, len(out), batch):
        stop = min(start + batch, len(out))
        chunk = texts(turns[2 * start : 2 * stop])
        if layout is None:
            out[start:stop] = encoded_lengths(chat, [messages(*chunk[i : i + 2]) for i in range(0, len(chunk), 2)])
            continue
        head, middle, tail = layout
        prompts = [head + question + middle for question in chunk[0::2]]
        answers = [answer_text(answer, chat.think)[1] + tail for answer in chunk[1::2]]
        out[start:stop] = count_tokens(chat.tokenizer, prompts) + count_tokens(chat.tokenizer, answers)
    return out


def texts(strings: Any) -> list[str]:
    """A Python list of an Arrow string array or any sequence of strings."""
    return strings.to_pylist() if hasattr(strings, "to_pylist") else list(strings)


def conversation_lengths(rows: np.ndarray, orders: Sequence[np.ndarray], prefix: int) -> np.ndarray:
    """Length of conversation i, made of rows `orders[0][i], orders[1][i], ...`: their sum, one prefix kept.

    `conversation_lengths(np.array([5, 7]), [np.array([0, 1]), np.array([1, 0])], prefix=1)` -> `[11, 11]`.
    """
    return sum(rows[order] for order in orders) - (len(orders) - 1) * prefix


def check_additive(
    chat: Chat, conversations: list[list[dict[str, str]]], predicted: np.ndarray
) -> tuple[int, int, int] | None:
    """None if `predicted` equals the direct count of every conversation; else (index, predicted, direct)."""
    direct = encoded_lengths(chat, conversations)
    for index in np.flatnonzero(direct != predicted):
        return int(index), int(predicted[index]), int(direct[index])
    return None


def summary(lengths: np.ndarray, limit: int, prefix: str) -> dict[str, int]:
    """p50/p95/p99/max of `lengths` and how many exceed `limit`, keyed `<prefix>_tokens_p50` and so on."""
    if len(lengths) == 0:
        return {f"{prefix}_tokens_over_max_seq_length": 0}
    stats = {f"{prefix}_tokens_p{p}": int(np.percentile(lengths, p, method="higher")) for p in PERCENTILES}
    return stats | {
        f"{prefix}_tokens_max": int(lengths.max()),
        f"{prefix}_tokens_total": int(lengths.sum()),
        f"{prefix}_tokens_over_max_seq_length": int((lengths > limit).sum()),
    }
