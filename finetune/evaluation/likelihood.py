"""Loss and perplexity on the learnt tokens of held-out conversations (answers only: prompt and padding masked).

Used by evaluate for the held-out loss of base and tuned model, and for the label benchmarks (each label's
likelihood as the answer).
"""

from __future__ import annotations

import math
from typing import Any

from finetune.tokens.chat import IGNORE_INDEX

Encoded = tuple[list[int], list[int]]  # a conversation's token ids and labels


def sequence_nll(model: Any, batch: list[Encoded], pad_id: int) -> list[tuple[float, int]]:
    """Per sequence of a right-padded batch: summed negative log-likelihood of its labelled tokens, their count."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    ).sum(dim=1)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [(float(n), int(c)) for n, c in zip(nll.tolist(), counts.tolist(), strict=True)]


def by_length(sizes: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar size, longest first: least padding, and any out-of-memory comes at once.

    `by_length([3, 9, 1, 8], 2)` -> `[[1, 3], [0, 2]]`.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def nll_per_row(model: Any, encoded: list[Encoded], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """`sequence_nll` of every row, computed in batches by length, returned in the rows' order."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for batch in by_length([len(ids) for ids, _ in encoded], batch_size):
        for i, result in zip(batch, sequence_nll(model, [encoded[i] for i in batch], pad_id), strict=True):
            out[i] = result
    return out


def score(model: Any, encoded: list[Encoded], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss per learnt token over all rows, and its perplexity."""
    rows = nll_per_row(model, encoded, pad_id, batch_size)
    tokens = sum(count for _, count in rows)
    if tokens == 0:
        raise ValueError(f"no learnt token in the {len(encoded)} held-out conversations: nothing to score")
    loss = sum(nll for nll, _ in rows) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
