"""Speed patches of the libraries, applied by the stages that train or score on the GPU (train, evaluate).

Kept apart from the loading code (`finetune.model.load`): tokenize reads that file for the tokenizer, and editing a
patch must not tokenize 771 M tokens again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

VARLEN_SWITCHES = ("UNSLOTH_TORCH_VARLEN", "UNSLOTH_LEAN_VARLEN")  # unsloth's switches of its varlen attention path


def apply_speed_patches() -> bool:
    """Apply every patch that fits this machine (on CUDA: `grouped_decode_attention` for generation, `flash_varlen`
    for training); whether flash varlen attention is on."""
    import torch

    if not torch.cuda.is_available():
        return False
    grouped_decode_attention()
    if not flash_varlen():
        return False
    log.info("padding-free attention: one flash varlen call per layer (torch %s)", torch.__version__)
    return True


def grouped_decode_attention() -> None:
    """Give unsloth's decode step (one new token per prompt of a left-padded batch, `generate`) an attention that
    reads each cached key and value once, not once per query head of its group.

    unsloth calls SDPA there with the batch's padding mask and `enable_gqa=True`; torch's flash kernel takes no mask
    and its memory-efficient kernel no grouped heads, so torch falls back to its math kernel, which repeats every K/V
    head for the query heads that share it and computes in float32: a step of the 8B shape took 67, 122 and 227 ms
    at 32, 64 and 128 prompts of up to 1,024 tokens on an H200 (BENCHMARKS.md, session 15). The query heads of one
    K/V head are handed to the kernel as that head's queries instead, `(batch, kv_heads, group, dim)` against
    `(batch, kv_heads, length, dim)`: the same attention, head for head, which the memory-efficient kernel takes,
    mask and all. cuDNN is kept out of the choice, as unsloth keeps it out of its own decode calls: it builds a
    plan per key length, that is per generated token (a first try without this took ~75 ms a step whatever the
    batch); pinned, a step took 41-73 ms from 32 to 256 prompts where unsloth's took 70-441 ms (1.7-10x, session
    16). Calls that are not such a decode step pass through unchanged. A no-op where unsloth no longer has the name
    it calls, or where it is patched already; unsloth's own function stays on the patch as `.unsloth_attention`.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from unsloth.models import llama

    unsloth_sdpa = getattr(llama, "scaled_dot_product_attention", None)
    if unsloth_sdpa is None or hasattr(unsloth_sdpa, "unsloth_attention"):
        return
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def scaled_dot_product_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        if not (kwargs.get("enable_gqa") and length == 1 and heads != kv_heads and not args):
            return unsloth_sdpa(query, key, value, *args, **kwargs)
        if kwargs.get("is_causal"):
            raise ValueError("a decode step attends to every cached token: is_causal must be False")
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # query head h uses K/V head h // group
        rest = {name: given for name, given in kwargs.items() if name not in ("enable_gqa", "is_causal")}
        with sdpa_kernel(backends):
            out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, **rest)
        return out.reshape(batch, heads, 1, dim)

    scaled_dot_product_attention.unsloth_attention = unsloth_sdpa  # type: ignore[attr-defined]
    llama.scaled_dot_product_attention = scaled_dot_product_attention


def unsloth_decode_attention() -> Any:
    """unsloth's own attention of its decode step, whether or not `grouped_decode_attention` has replaced it (to
    compare the two, or to put unsloth's back)."""
    from unsloth.models import llama

    attention = getattr(llama, "scaled_dot_product_attention", None)
    return getattr(attention, "unsloth_attention", attention)


GRAPH_SWITCH = "UNSLOTH_DECODE_CUDA_GRAPHS"  # unsloth's switch of its decode replay; 0 keeps evaluate's off


def decode_graphs_wanted() -> bool:
    """Whether `decode_cuda_graphs` turns the replay on here: on CUDA, unless `UNSLOTH_DECODE_CUDA_GRAPHS=0`."""
    import torch

    return torch.cuda.is_available() and torch.version.hip is None and os.environ.get(GRAPH_SWITCH) != "0"


def decode_graph_counts(model: Any) -> dict[str, int]:
    """unsloth's counts of captured, replayed and eager decode steps of `model` so far (every count 0 where it never
    ran a step for the replay)."""
    from unsloth.models import _decode_graphs as graphs

    counts = {"captures": 0, "replays": 0, "eager_steps": 0}
    for state in graphs._states(model):
        counts = {name: count + getattr(state, name) for name, count in counts.items()}
    return counts


@contextlib.contextmanager
def decode_cuda_graphs(model: Any) -> Iterator[None]:
    """Inside, unsloth replays `model`'s one-token decode step (`generate`) as CUDA graphs where
    `decode_graphs_wanted`, and logs how many steps replayed; after, on CUDA, it frees the graphs and every decode
    buffer (the replay's, sized to prompt + new tokens, and the eager step's), replayed or not. Kept, they stayed
    beside the next batch's: FinQA's third batch on the 8B shape ran out of an H200's memory (BENCHMARKS.md, session
    17).

    With the grouped decode attention the eager step is bound by its hundreds of kernel launches, not by the
    attention: replayed, a step of the 8B shape took 21.4 / 26.9 / 38.6 ms at 32 / 128 / 256 prompts of up to 1,024
    tokens, against 41.4 / 43.4 / 43.2 ms eager (an H200, BENCHMARKS.md, session 16). unsloth captures the step per
    batch size, runs each layer's attention eagerly between the captured parts over the true cache length, and
    re-captures when the weights or the active adapters change (`disable_adapter` included), so a replayed step
    computes what the eager step computes, bit for bit (`tests/test_gpu.py`). It keeps the eager step where it does
    not support a model (Qwen2 is not on its list in 2026.10.9) and says why in the log line. Out of `generate`
    (training, scoring) nothing changes.
    """
    import torch

    if not torch.cuda.is_available():
        yield
        return
    from unsloth.models import _decode_graphs as graphs

    wanted = decode_graphs_wanted()
    before, counts = graphs.ENABLED, decode_graph_counts(model)
    graphs.ENABLED = wanted
    try:
        yield
    finally:
        graphs.ENABLED = before
        ran = {name: count - counts[name] for name, count in decode_graph_counts(model).items()}
        reasons = {state.disabled for state in graphs._states(model) if state.disabled}
        graphs.release_for_training(model)  # release(), and the eager step's buffers too
        if wanted:
            log.info(
                "decode steps as CUDA graphs: %d captured, %d replayed, %d eager%s",
                *(ran["captures"], ran["replays"], ran["eager_steps"]),
                f" (not replayed: {'; '.join(sorted(reasons))})" if reasons else "",
            )


def flash_kernel() -> bool:
    """Whether torch's flash attention kernel runs here: CUDA (not ROCm), a flash build, an Ampere or newer GPU."""
    import torch

    return (
        torch.cuda.is_available()
        and torch.version.hip is None
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability()[0] >= 8
    )


def flash_varlen() -> bool:
    """Whether unsloth runs the attention of a padding-free batch as one call of torch's flash varlen kernel per
    layer; where its own check refuses the installed torch, give it that kernel.

    unsloth takes the kernel only from a torch whose `varlen_attn` has `enable_gqa` (2.12 on); with an older one (the
    GPU image's 2.11) it makes one cuDNN call per run of equal lengths, with copies and fills around them: ~8 calls
    per layer on the data's length mix, which made the 8B shape 6 % slower (BENCHMARKS.md, session 11). What it calls
    on 2.12+, `aten._flash_attention_forward` and `_backward` over `cu_seqlens` with a window (`_LeanFlashVarlen`),
    is in torch's flash build before that too, and takes grouped K/V heads as they are. False where there is no flash
    kernel (a GPU before Ampere, ROCm, a build without it), where unsloth's varlen path is turned off
    (`UNSLOTH_TORCH_VARLEN=0`, `UNSLOTH_LEAN_VARLEN=0`), or where unsloth no longer has the parts named here: then
    it keeps its own choice.
    """
    import torch
    from unsloth.utils import attention_dispatch as dispatch

    if not flash_kernel():
        return False
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return True
    if any(os.environ.get(name, "1").lower() in ("0", "false", "no", "off") for name in VARLEN_SWITCHES):
        return False
    lean = getattr(dispatch, "_LeanFlashVarlen", None)
    if lean is None or not hasattr(dispatch, "_LEAN_VARLEN"):
        return False
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    if "window_size_left" not in schema or "window_size_right" not in schema:
        return False

    def varlen_attn(
        query: Any,
        key: Any,
        value: Any,
        cu_seq_q: Any,
        cu_seq_k: Any,
        max_q: int,
        max_k: int,
        *,
        scale: float | None = None,
        window_size: tuple[int, int] = (-1, -1),
        enable_gqa: bool = False,
    ) -> Any:
        # unsloth passes one cu_seqlens for queries and keys, and grouped K/V heads unexpanded (enable_gqa)
        return lean.apply(query, key, value, cu_seq_q, max_q, tuple(window_size) == (-1, 0), scale, *window_size)

    dispatch._TORCH_VARLEN_ATTN = varlen_attn
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False  # 2.11's varlen has no cuDNN path either
    return True
