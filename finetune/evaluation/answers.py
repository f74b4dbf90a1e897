"""Greedy answers to held-out prompts and their scores against the reference answers (ROUGE-L, token F1, EOS)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from finetune.evaluation import scoring
from finetune.evaluation.likelihood import by_length, by_tokens
from finetune.model.patches import decode_cuda_graphs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    text: str  # decoded, the end-of-sequence token left out (other special tokens, </think> say, kept)
    tokens: int  # tokens generated, the end-of-sequence token included
    ended: bool  # stopped with the end-of-sequence token before max_new_tokens


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
) -> list[Answer]:
    """Greedy answers to prompts given as token ids, in the prompts' order, batched by length (longest first) and
    left-padded by the tokenizer: `batch_size` prompts a batch, or as many as hold at most `batch_tokens` tokens
    once padded to their longest and grown by `max_new_tokens` (what their keys and values take); one of the two.
    On CUDA the decode steps replay as CUDA graphs (`decode_cuda_graphs`), freed after each batch.
    """
    import torch

    if (batch_size is None) == (batch_tokens is None):
        raise ValueError(f"give batch_size or batch_tokens, one of them: got {batch_size} and {batch_tokens}")
    device = next(model.parameters()).device
    answers: list[Answer | None] = [None] * len(prompts)
    sizes = [len(ids) + max_new_tokens for ids in prompts]
    batches = list(by_tokens(sizes, batch_tokens) if batch_tokens else by_length(sizes, batch_size or 1))
    for number, batch in enumerate(batches, start=1):
        padded = tokenizer.pad({"input_ids": [prompts[i] for i in batch]}, padding_side="left", return_tensors="pt").to(
            device
        )
        width = padded["input_ids"].shape[1]
        clock = time.perf_counter()
        with torch.no_grad(), decode_cuda_graphs(model):  # freed after each batch: the next is sized anew
            output = model.generate(
                **padded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        peak = f", GPU peak so far {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        log.info(
            "batch %d/%d: %d prompts of up to %d tokens, %d new tokens in %.1f s%s",
            *(number, len(batches), len(batch), width, output.shape[1] - width, time.perf_counter() - clock, peak),
        )
        for i, new in zip(batch, output[:, width:].tolist(), strict=True):
            ended = tokenizer.eos_token_id in new
            kept = new[: new.index(tokenizer.eos_token_id) + 1] if ended else new
            # special tokens are kept but EOS: </think> may be one, and split_generated needs it
            answers[i] = Answer(tokenizer.decode(kept[:-1] if ended else kept), len(kept), ended)
    return [answer for answer in answers if answer is not None]


def answer_scores(answers: list[Answer], finals: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L and token F1 of the final answers (`finals`: the text after each answer's reasoning block, empty
    where the reasoning was cut short) against the references, share ended with EOS, mean answer length in tokens."""
    if not answers:
        return {}
    n = len(answers)
    pairs = list(zip(finals, references, strict=True))
    return {
        "rouge_l": sum(scoring.rouge_l(answer, reference) for answer, reference in pairs) / n,
        "token_f1": sum(scoring.token_f1(answer, reference) for answer, reference in pairs) / n,
        "eos_rate": sum(a.ended for a in answers) / n,
        "answer_tokens": sum(a.tokens for a in answers) / n,
    }
