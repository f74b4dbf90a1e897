"""Batches without a model: a training step's conversations dealt to processes and micro-batches by tokens, a
micro-batch cut into passes between conversations, rows said to be cut only when none is longer; evaluate's rows
batched by length and by tokens."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from finetune.evaluation.likelihood import by_length, by_tokens
from finetune.tokens.chat import IGNORE_INDEX
from finetune.training.batching import check_cut, cut_by_tokens, split_step_by_tokens


def test_rows_are_said_to_be_cut_only_when_none_is_longer() -> None:
    rows = Dataset.from_dict({"input_ids": [[1] * 5, [1] * 9, [1] * 7], "labels": [[1] * 5, [1] * 9, [1] * 7]})
    with pytest.raises(ValueError, match="row 1 of the tokenized data has 9 tokens, more than model.max_seq_length 8"):
        check_cut(rows, 8)
    assert "_unsloth_truncated_to" not in vars(rows)
    check_cut(rows, 9)  # unsloth keeps padding-free batching for rows it is told are cut
    assert vars(rows)["_unsloth_truncated_to"] == 9


def test_a_steps_conversations_are_dealt_to_processes_and_micro_batches_by_tokens() -> None:
    import random

    generator = random.Random(0)
    lengths = [generator.choice([40, 300, 900, 2048]) + generator.randrange(40) for _ in range(64)]
    indices = list(range(100, 164))
    for ranks, slots in ((2, 1), (2, 2), (4, 2), (1, 4)):
        dealt = split_step_by_tokens(indices, lengths, ranks, slots)
        assert len(dealt) == ranks and all(len(batches) == slots for batches in dealt)
        batches = [batch for rank in dealt for batch in rank]
        assert sorted(i for batch in batches for i in batch) == indices and all(batches)  # each once, none empty
        totals = [sum(lengths[i - 100] for batch in rank for i in batch) for rank in dealt]
        assert max(totals) - min(totals) <= max(lengths)  # no process waits for more than one conversation
        for slot in range(slots - 1):  # heavier micro-batches first, on every process alike
            assert all(
                sum(lengths[i - 100] for i in rank[slot]) >= sum(lengths[i - 100] for i in rank[slot + 1])
                for rank in dealt
            )
    assert split_step_by_tokens([0, 1, 2, 3], [9, 1, 5, 4], ranks=2, slots=1) == [[[0, 1]], [[2, 3]]]


def test_a_micro_batch_is_cut_into_passes_of_at_most_so_many_tokens_between_conversations() -> None:
    lengths = [5, 3, 4, 2, 6]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    row = {  # padding-free, as unsloth's collator gives it: one row, each conversation's length
        "input_ids": torch.arange(20).unsqueeze(0),
        "labels": torch.arange(100, 120).unsqueeze(0),
        "position_ids": positions,
        "packed_seq_lengths": torch.tensor(lengths, dtype=torch.int32),
    }
    passes = cut_by_tokens(row, 8)
    assert [p["packed_seq_lengths"].tolist() for p in passes] == [[5, 3], [4, 2], [6]]  # the fewest passes of <= 8
    for key in ("input_ids", "labels", "position_ids"):  # in order, nothing lost
        assert torch.equal(torch.cat([p[key] for p in passes], dim=1), row[key])
    assert [p["input_ids"].shape[1] for p in cut_by_tokens(row, 11)] == [8, 6, 6]  # 3 passes, the largest made small
    assert cut_by_tokens(row, 20) == [row]
    trl_row = {key: row[key] for key in ("input_ids", "labels", "position_ids")}  # lengths from the positions
    assert [p["position_ids"].tolist() for p in cut_by_tokens(trl_row, 10)] == [
        [[0, 1, 2, 3, 4, 0, 1, 2]],
        [[0, 1, 2, 3, 0, 1]],
        [[0, 1, 2, 3, 4, 5]],
    ]
    # as many passes as another process needs: the heaviest halved; with too few conversations, idle passes
    assert [p["packed_seq_lengths"].tolist() for p in cut_by_tokens(row, 8, passes=4)] == [[5], [3], [4, 2], [6]]
    idle = cut_by_tokens(row, 20, passes=6)[5]
    assert idle["input_ids"].tolist() == [[0, 1, 2, 3, 4]] and set(idle["labels"].flatten().tolist()) == {IGNORE_INDEX}
    padded = {"input_ids": torch.ones(5, 4), "attention_mask": torch.ones(5, 4), "labels": torch.ones(5, 4)}
    assert [p["input_ids"].shape[0] for p in cut_by_tokens(padded, 9)] == [2, 2, 1]  # rows of 4 positions
    with pytest.raises(ValueError, match="train.micro_batch_tokens is 5, but a conversation of this batch takes 6"):
        cut_by_tokens(row, 5)


def test_batches_by_length_cover_every_row_once() -> None:
    assert by_length([3, 9, 1, 8], 2) == [[1, 3], [0, 2]]
    batches = by_length(list(range(10)), 3)
    assert sorted(i for batch in batches for i in batch) == list(range(10)) and len(batches[-1]) == 1
    assert by_tokens([3, 9, 1, 8], 18) == [[1, 3], [0, 2]]
    assert by_tokens([3, 9, 1, 8], 8) == [[1], [3], [0, 2]]  # a row longer than the budget goes alone
    batches = by_tokens(list(range(1, 11)), 12)
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert all(len(batch) * (max(batch) + 1) <= 12 or len(batch) == 1 for batch in batches)
