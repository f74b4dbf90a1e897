"""How conversations are laid out in the training's batches: each step's conversations split over the processes
and micro-batches by tokens, every row checked against the cut, and how the run is tagged for it."""

from __future__ import annotations

from typing import Any

from finetune.model.load import ModelConfig
from finetune.model.patches import flash_varlen
from finetune.tokens.chat import IGNORE_INDEX


def split_step_by_tokens(indices: list[int], lengths: list[int], ranks: int, slots: int) -> list[list[list[int]]]:
    """One optimizer step's conversations as `ranks` x `slots` micro-batches of near-equal tokens: longest first,
    each to the micro-batch with the fewest tokens so far (every one gets one, given as many conversations); then
    the heaviest `ranks` micro-batches are the first slot of each process, the next ones the second, and so on.
    For padding-free batches, whose cost is their tokens: transformers' own split balances padded batches, which
    left the two GPUs 9-18 % apart on the real length mix where this leaves them 0.6 % apart (BENCHMARKS.md).

    `split_step_by_tokens([0, 1, 2, 3], [9, 1, 5, 4], ranks=2, slots=1)` -> `[[[0, 1]], [[2, 3]]]` (10 tokens each).
    """
    count = ranks * slots
    batches: list[list[int]] = [[] for _ in range(count)]
    tokens = [0] * count
    for index, length in sorted(zip(indices, lengths, strict=True), key=lambda pair: (-pair[1], pair[0])):
        lightest = min(range(count), key=lambda batch: (tokens[batch], batch))
        batches[lightest].append(index)
        tokens[lightest] += length
    heaviest = sorted(range(count), key=lambda batch: (-tokens[batch], batch))
    return [[batches[heaviest[slot * ranks + rank]] for slot in range(slots)] for rank in range(ranks)]


def cut_by_tokens(batch: dict[str, Any], limit: int, passes: int = 1) -> list[dict[str, Any]]:
    """`batch`, a micro-batch as the collator gives it, cut into passes of at most `limit` positions (tokens, padding
    included): as few as hold it, but at least `passes`, the largest as small as that allows (`balanced_runs`). A
    padding-free row (`(1, T)` with `position_ids`; each conversation's length in unsloth's `packed_seq_lengths`,
    else where its positions restart at 0) is cut between conversations, in order; a padded batch `(rows, length)`
    between rows. Every tensor of the batch's leading shape is cut alike; the others go to each pass as they are.
    Where the batch has fewer conversations than `passes`, idle passes make up the count: its first conversation
    again, every label ignored, which adds nothing to the loss or the gradients (several processes run as many passes
    each: `TokenCountingTrainer`). A conversation or row longer than `limit` is refused.

    A row of conversations of 5, 3, 4 and 2 tokens cut at 8 is two passes, 5 + 3 and 4 + 2."""
    ids, lengths = batch["input_ids"], batch.get("packed_seq_lengths")
    if ids.numel() <= limit and passes <= 1:  # it fits: no need to read the lengths (a host sync on the GPU)
        return [batch]
    if ids.shape[0] == 1 and "position_ids" in batch:  # padding-free: cut between conversations
        if lengths is None:  # TRL's collator alone: each conversation's positions start at 0
            starts = [int(i) for i in (batch["position_ids"][0] == 0).nonzero().flatten()]
            lengths = [after - start for start, after in zip(starts, [*starts[1:], ids.shape[1]], strict=True)]
        sizes = [int(n) for n in (lengths.tolist() if hasattr(lengths, "tolist") else lengths)]  # one read
        sizes[-1] += ids.shape[1] - sum(sizes)  # a pad tail, if any, goes with the last conversation
        axis = 1
    else:  # padded: cut between rows
        sizes, axis = [ids.shape[1]] * ids.shape[0], 0
    if max(sizes) > limit:
        raise ValueError(
            f"train.micro_batch_tokens is {limit}, but a conversation of this batch takes {max(sizes)} positions: "
            "one pass holds at least one whole conversation; raise it to model.max_seq_length or more"
        )
    groups = balanced_runs(sizes, limit, passes)

    def part(first: int, last: int) -> dict[str, Any]:
        start, stop = (sum(sizes[:first]), sum(sizes[:last])) if axis == 1 else (first, last)
        cut = {key: along(value, ids.shape, axis, start, stop) for key, value in batch.items()}
        if axis == 1 and "packed_seq_lengths" in batch:
            cut["packed_seq_lengths"] = batch["packed_seq_lengths"][first:last]
        return cut

    cuts = [part(first, last) for first, last in groups]
    if len(cuts) < passes:
        first = part(0, 1)
        ignored = {key: first[key].clone().fill_(IGNORE_INDEX) for key in ("labels", "shift_labels") if key in first}
        cuts += [first | ignored] * (passes - len(cuts))
    return cuts


def balanced_runs(sizes: list[int], limit: int, count: int = 1) -> list[tuple[int, int]]:
    """`sizes` in order as `(first, last)` runs of at most `limit` in sum: the fewest runs, or `count` if more (and
    there are as many sizes), the largest as small as that allows: the smallest cap that makes no more runs
    (bisected), then the largest run of several halved until there are `count`."""

    def runs(cap: int) -> list[tuple[int, int]]:
        found, first, total = [], 0, 0
        for i, size in enumerate(sizes):
            if total + size > cap:
                found.append((first, i))
                first, total = i, 0
            total += size
        return [*found, (first, len(sizes))]

    wanted = min(max(len(runs(limit)), count), len(sizes))
    low, high = max(sizes), limit  # runs(high) makes at most `wanted` runs; find the smallest cap that does
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(runs(middle)) <= wanted else (middle + 1, high)
    found = runs(high)
    while len(found) < wanted:  # the bisection can skip a count: halve the heaviest run of several sizes
        first, last = max((run for run in found if run[1] - run[0] > 1), key=lambda run: sum(sizes[run[0] : run[1]]))
        half = sum(sizes[first:last]) / 2
        cut = min(range(first + 1, last), key=lambda i: abs(sum(sizes[first:i]) - half))
        found[found.index((first, last)) : found.index((first, last)) + 1] = [(first, cut), (cut, last)]
    return found


def along(value: Any, shape: Any, axis: int, start: int, stop: int) -> Any:
    """`value[start:stop]` along `axis` if it is a tensor of the batch's leading `shape`, else `value`."""
    if getattr(value, "shape", None) is None or tuple(value.shape[: axis + 1]) != tuple(shape[: axis + 1]):
        return value
    return value[:, start:stop] if axis == 1 else value[start:stop]


def token_counts(rows: Any) -> Any:
    """The number of tokens of each of the tokenized `rows` (a pyarrow array), read from the Arrow offsets."""
    import pyarrow.compute as pc

    return pc.list_value_length(rows.with_format("arrow")["input_ids"])


def check_cut(rows: Any, max_length: int) -> None:
    """Check that every row of the tokenized `rows` has at most `max_length` tokens (the tokenize stage cuts them
    there), and say so to unsloth: without its `_unsloth_truncated_to` mark it turns padding-free batching off for
    any dataset that is already tokenized, since it cannot cut the rows itself (on the 8B shape: 27.8 % of every
    batch was padding, BENCHMARKS.md)."""
    import pyarrow.compute as pc

    lengths = token_counts(rows)
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > max_length:
        row = pc.index(lengths, longest).as_py()
        raise ValueError(
            f"row {row} of the tokenized data has {longest} tokens, more than model.max_seq_length {max_length}: "
            "the tokenize stage cut it at another length; rerun it (dvc repro)"
        )
    rows._unsloth_truncated_to = max_length


def batching_tags(args: Any, model_config: ModelConfig) -> dict[str, str]:
    """How the trainer lays conversations out in its batches and runs their attention, as the MLflow run is tagged:
    `packed` rows (TRL's bfd), `padding-free` batches (whole conversations in one row, no pad token) or `padded`
    ones; attention `flash-varlen` (one call of torch's flash kernel per layer over a row's conversations, in 16 bits:
    `finetune.model.patches.flash_varlen`) or `sdpa` (PyTorch's scaled_dot_product_attention, per run of equal
    lengths)."""
    import torch

    layout = "packed" if args.packing else "padding-free" if args.padding_free else "padded"
    sixteen_bit = model_config.dtype != "float32"  # flash has no float32 kernel
    flash = layout != "padded" and sixteen_bit and torch.cuda.is_available() and flash_varlen()
    return {"fit.batching": layout, "fit.attention": "flash-varlen" if flash else "sdpa"}
