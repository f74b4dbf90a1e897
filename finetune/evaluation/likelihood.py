"""Loss and perplexity on the learnt tokens of held-out conversations (answers only: prompt and padding masked),
and the likelihood of each of a prompt's possible answers.

Used by evaluate for the held-out loss of base and tuned model (`nll_per_row`, `mean_loss`), and for the label
benchmarks (each label's likelihood as the answer: `choice_nll`).
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


def by_tokens(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """Indices in batches of similar size, longest first, each at most `max_tokens` once padded to its longest row
    (a longer row goes alone): least padding, and any out-of-memory comes at once.

    `by_tokens([3, 9, 1, 8], 18)` -> `[[1, 3], [0, 2]]`.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if batches and (len(batches[-1]) + 1) * sizes[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def by_length(sizes: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar size, longest first: least padding, and any out-of-memory comes at once.

    `by_length([3, 9, 1, 8], 2)` -> `[[1, 3], [0, 2]]`.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def nll_per_row(model: Any, encoded: list[Encoded], pad_id: int, max_tokens: int) -> list[tuple[float, int]]:
    """`sequence_nll` of every row, computed in batches of at most `max_tokens` padded tokens, in the rows' order."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for batch in by_tokens([len(ids) for ids, _ in encoded], max_tokens):
        for i, result in zip(batch, sequence_nll(model, [encoded[i] for i in batch], pad_id), strict=True):
            out[i] = result
    return out


def mean_loss(rows: list[tuple[float, int]]) -> dict[str, float]:
    """Mean loss per learnt token of rows' (summed negative log-likelihood, learnt tokens), and its perplexity."""
    tokens = sum(count for _, count in rows)
    if tokens == 0:
        raise ValueError(f"no learnt token in the {len(rows)} held-out conversations: nothing to score")
    loss = sum(nll for nll, _ in rows) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def shared_length(sequences: list[list[int]]) -> int:
    """How many first tokens all the sequences share. `shared_length([[1, 2, 3], [1, 2, 4]])` -> 2."""
    shortest = min(len(ids) for ids in sequences)
    return next((i for i in range(shortest) if len({ids[i] for ids in sequences}) > 1), shortest)


def repeat_rows(past: Any, times: int) -> Any:
    """Keys and values of a batch with each row repeated `times` times in place (rows 0, 0, 1, 1, ... for 2)."""
    if hasattr(past, "batch_repeat_interleave"):  # a transformers Cache
        past.batch_repeat_interleave(times)
        return past
    return tuple(tuple(tensor.repeat_interleave(times, dim=0) for tensor in layer) for layer in past)


def choice_nll(model: Any, rows: list[list[Encoded]], max_tokens: int) -> list[list[float]]:
    """Per row, for each of its choices (a prompt and one possible answer, encoded), the summed negative
    log-likelihood of the choice's learnt tokens after the tokens that all the row's choices share: what tells them
    apart, the shared tokens scoring the same in each.

    The shared prompt runs once, and its keys and values, repeated for each choice, are where all the row's choices
    continue from, in one pass (the cache stops two tokens early, so that each choice's pass has two tokens or more
    and runs as a prefill, never as a one-token decoding step): a row of k choices costs its prompt once, not k
    times. Rows whose cached prompts are equally long and whose choices continue with the same tokens batch together
    with no padding, up to `max_tokens` prompt tokens a pass (the choices' pass holds k times their keys and values).
    """
    import torch

    device = next(model.parameters()).device
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, choices in enumerate(rows):
        if len(choices) < 2 or len({tuple(ids) for ids, _ in choices}) < len(choices):
            raise ValueError(f"row {index}: expected two or more different choices, got {len(choices)}")
        shared = max(shared_length([ids for ids, _ in choices]), 1)  # the first token has no prediction
        cached = max(shared - 2, 0)
        tails = tuple((tuple(ids[cached:]), tuple(labels[shared:])) for ids, labels in choices)
        groups.setdefault((cached, shared, tails), []).append(index)

    out: list[list[float]] = [[] for _ in rows]
    for (cached, shared, tails), members in groups.items():
        k, longest = len(tails), max(len(tail) for tail, _ in tails) - 1  # each choice's tokens but its last
        # the choices side by side, each row's k in a block: padded at the end, where no target looks
        inputs = [list(tail[:-1]) + [tail[-1]] * (longest - len(tail) + 1) for tail, _ in tails]
        skip = [IGNORE_INDEX] * (shared - cached - 1)  # predictions of tokens all the choices share
        targets = [skip + list(learnt) + [IGNORE_INDEX] * (longest - len(skip) - len(learnt)) for _, learnt in tails]
        step = max(1, max_tokens // (cached + longest + 1))
        for start in range(0, len(members), step):
            batch = members[start : start + step]
            past = None
            with torch.no_grad():
                if cached:
                    prompts = torch.tensor([rows[i][0][0][:cached] for i in batch], device=device)
                    past = model(input_ids=prompts, use_cache=True, logits_to_keep=1).past_key_values
                    if past is None:
                        raise RuntimeError(f"{type(model).__name__} returned no keys and values to continue from")
                    past = repeat_rows(past, k)
                logits = model(
                    input_ids=torch.tensor(inputs * len(batch), device=device),
                    past_key_values=past,
                    position_ids=torch.arange(cached, cached + longest, device=device).expand(len(batch) * k, -1),
                    attention_mask=torch.ones(len(batch) * k, cached + longest, dtype=torch.long, device=device),
                    use_cache=past is not None,
                ).logits
                nll = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2),
                    torch.tensor(targets * len(batch), device=device),
                    ignore_index=IGNORE_INDEX,
                    reduction="none",
                ).sum(dim=1)
            values = nll.view(len(batch), k).tolist()
            for i, row in zip(batch, values, strict=True):
                out[i] = row
    return out
