"""How conversations are laid out in the training's batches: each step's conversations split over the processes
and micro-batches by tokens, every row checked against the cut, and how the run is tagged for it."""

from __future__ import annotations

from typing import Any

from finetune.model.load import ModelConfig
from finetune.model.patches import flash_varlen


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
