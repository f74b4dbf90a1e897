"""Padding-free batches through unsloth's compiled decoder blocks, for the train stage on a CUDA GPU.

unsloth 2026.10.9 compiles each decoder block as one region on CUDA (`unsloth/models/_block_compile.py`), but runs a
block eagerly whenever its call carries `packed_seq_lengths` on a forward of unsloth's own (a padding-free batch on
Llama or Qwen2): its packed attention reads the segment lengths on the host, which inside the region would make a
graph for each new set of lengths. `let_in` lets padding-free batches into the region:
- each decoder layer class's forward is wrapped in a function of this module: `_block_compile` keeps eager only the
  forwards defined in `unsloth.models`;
- the hook that `_block_compile` calls eagerly before each compiled block (`hf_packed_attention.block_varlen_kwargs`,
  there for transformers' own forwards) returns, for a wrapped layer, the row's `(lengths, cu_seqlens, max_seqlen)`,
  computed there on the host once a micro-batch (unsloth caches them on the lengths tensor), cu_seqlens covering any
  pad tail, the segment count marked dynamic;
- inside the block, unsloth's attention takes them from that keyword instead of reading the lengths itself, and runs
  them as one call of aten's flash varlen kernel (unsloth's `_flash_varlen`, what its compiled blocks run for
  transformers' forwards).
Measured on the 8B shape, one H200 (BENCHMARKS.md, session 22), with `auto`'s 16-bit base and no checkpointing: 2 % more
tokens/s on the data's length mix and on rows of one length, 57 GiB peak instead of 69, losses equal within 1e-3, three
recompiles in a run (the rotary table growing to a packed row's length). With LoRA on all seven projections at r 16 they
were 1 % slower (session 22: unsloth's fused LoRA MLP is a custom autograd function, which the compiler runs as an
opaque call), and faster than the eager blocks once the MLP's LoRA ran through peft's layers, which the compiler sees
through: 15,527 tokens/s against 14,326 in one call (session 25, one run each; the eager run stalled once, as it did in
a second call at 14,824), 15,910 with `train.micro_batch_tokens` (session 26, median of 3), 15,987 against 15,735 with
q/k/v's and o's LoRA through peft's layers too (session 27, one run each; then 15,823, median of 3, 1.307× the bare
unsloth + TRL loop in the same call). So the stage compiles them where they were measured faster (`measured_faster`): a
16-bit base and no gradient checkpointing, on a Llama-architecture model (the 8B distill; the 70B's checkpoint is 4-bit,
and a Qwen2 model keeps its eager padding-free blocks); and, after `get_peft_model`, `unfuse_lora` gives the layers
unsloth fused back their peft layers. `let_in` patches whatever the setting, for a speed script to measure the others.
unsloth compiles no block on the CPU, where it fuses no LoRA MLP either, and the kernel is flash's: without CUDA and a
flash build on an Ampere or newer GPU nothing is patched.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune.model.patches import flash_kernel

log = logging.getLogger(__name__)

COMPILED_CLASSES = ("LlamaDecoderLayer",)  # decoder layers measured compiled (the Llama distills)
_ORIGINAL: dict[str, Any] = {}  # unsloth's functions this module replaces, by name, once patched


def compile_padding_free_blocks(model: Any, load_in_4bit: bool, lora: Any) -> list[str]:
    """`let_in` where `measured_faster` says so for the base's precision and the LoRA settings (`LoraConfig`, with
    `auto` resolved); call it after loading the base and before `get_peft_model`, which compiles the blocks. Returns
    the names of the classes wrapped (none where nothing was patched)."""
    if not flash_kernel():  # no compiled blocks (the CPU), or not the kernel they would call: nothing to say
        return []
    if not measured_faster(load_in_4bit, lora):
        log.info(
            "padding-free batches stay out of unsloth's compiled decoder blocks: measured faster only with a 16-bit "
            "base and no gradient checkpointing (load_in_4bit %s, use_gradient_checkpointing %s)",
            *(load_in_4bit, lora.use_gradient_checkpointing),
        )
        return []
    return let_in(model)


def measured_faster(load_in_4bit: bool, lora: Any) -> bool:
    """Whether compiled padding-free blocks were measured faster than eager ones for these settings (see above): LoRA
    on the attention (r 4) and on all seven projections (r 16, with `unfuse_lora`) were; other sets of
    projections run the same two paths."""
    return not load_in_4bit and not lora.use_gradient_checkpointing


def unfuse_lora(model: Any) -> tuple[int, int]:
    """After `get_peft_model`, for blocks that compile: LoRA through peft's layers where unsloth fused it, on the MLPs
    (`unfuse_lora_mlps`) and, where the MLPs had LoRA too, on the attention (`unfuse_lora_attention`); both measured
    faster so (see above). The attention alone (the seed's r 4 on q/k/v/o) keeps unsloth's fused functions, as measured
    (17,013 tokens/s, session 26): those fold LoRA's scale (alpha / r = 4) into their `addmm_`, where peft's layers
    multiply the whole output by it. Returns (MLPs, attentions) changed."""
    mlps = unfuse_lora_mlps(model)
    return mlps, unfuse_lora_attention(model) if mlps else 0


def unfuse_lora_attention(model: Any) -> int:
    """The attentions whose q/k/v or o LoRA unsloth fused (`apply_qkv`, `apply_o`, set on CUDA) go back to unsloth's
    plain functions, through peft's LoRA layers, as unsloth does for FSDP. Returns how many attentions changed."""
    from unsloth.models.llama import apply_lora_o, apply_lora_qkv, original_apply_o, original_apply_qkv

    fused = [
        layer.self_attn
        for layer in decoder_layers(model)
        if vars(layer.self_attn).get("apply_qkv") is apply_lora_qkv
        or vars(layer.self_attn).get("apply_o") is apply_lora_o
    ]
    for attention in fused:
        if attention.apply_qkv is apply_lora_qkv:
            attention.apply_qkv = original_apply_qkv
        if attention.apply_o is apply_lora_o:
            attention.apply_o = original_apply_o
    if fused:
        log.info(
            "LoRA on q/k/v and o of %d compiled blocks through peft's layers, not unsloth's fused ones", len(fused)
        )
    return len(fused)


def unfuse_lora_mlps(model: Any) -> int:
    """After `get_peft_model`, for blocks that compile: the MLPs whose LoRA unsloth fused (an instance `forward`, set on
    CUDA) go back to their class's forward through peft's LoRA layers, measured faster inside a compiled block (see
    above). Their gradients are those of float32 autograd as the fused MLP's are (tests/test_gpu.py). Returns how many
    MLPs changed."""
    from unsloth.models.llama import _FUSED_LORA_MLPS  # the functions unsloth binds as an MLP's forward

    fused = [
        layer.mlp
        for layer in decoder_layers(model)
        if getattr(vars(layer.mlp).get("forward"), "__func__", None) in _FUSED_LORA_MLPS
    ]
    for mlp in fused:
        del mlp.forward
    if fused:
        log.info("LoRA on the MLP of %d compiled blocks through peft's layers, not unsloth's fused MLP", len(fused))
    return len(fused)


def let_in(model: Any) -> list[str]:
    """Patch unsloth so that `model`'s decoder blocks compile for padding-free batches too (Llama-architecture
    layers, on CUDA with flash); call it before `get_peft_model`. Returns the names of the classes wrapped."""
    classes = {type(layer) for layer in decoder_layers(model) if type(layer).__name__ in COMPILED_CLASSES}
    if not classes or not flash_kernel():
        return []
    patch_unsloth()
    for cls in classes:
        if cls.forward.__module__ != __name__:
            cls.forward = wrapped(cls.forward)
    names = sorted(cls.__name__ for cls in classes)
    log.info("padding-free batches into unsloth's compiled decoder blocks of %s", ", ".join(names))
    return names


def patch_unsloth() -> None:
    """Point unsloth's hook before a compiled block, its attention's packed metadata and its attention at this
    module's (once; unsloth's own stay in `_ORIGINAL`)."""
    import unsloth.models.llama as llama  # first: unsloth.utils' modules import each other through it
    from unsloth.utils import hf_packed_attention, packing

    if _ORIGINAL:
        return
    _ORIGINAL.update(
        block_varlen_kwargs=hf_packed_attention.block_varlen_kwargs,
        get_packed_info_from_kwargs=packing.get_packed_info_from_kwargs,
        run_attention=llama.run_attention,
    )
    hf_packed_attention.block_varlen_kwargs = block_seq_info
    llama.get_packed_info_from_kwargs = seq_info
    llama.run_attention = attention


def block_seq_info(layer: Any, hidden_states: Any, kwargs: dict[str, Any]) -> Any:
    """Eager, before a compiled block: for a wrapped layer's padding-free row, `(lengths, cu_seqlens, max_seqlen)`,
    cu_seqlens covering the pad tail that flash varlen would leave unwritten; unsloth's own hook for other layers."""
    import torch
    from unsloth.utils import packing

    if type(layer).__name__ not in COMPILED_CLASSES:
        return _ORIGINAL["block_varlen_kwargs"](layer, hidden_states, kwargs)
    info = _ORIGINAL["get_packed_info_from_kwargs"](kwargs, hidden_states.device)
    if info is None:
        return None
    cu_seqlens, max_seqlen = packing.cover_padded_cu_seqlens(info, hidden_states.shape[0] * hidden_states.shape[1])
    # the segment count changes every micro-batch: one graph for all of them, as unsloth marks its own
    for tensor in (kwargs["packed_seq_lengths"], info[0], cu_seqlens):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return info[0], cu_seqlens, int(max_seqlen)


def seq_info(kwargs: dict[str, Any], device: Any, position_ids: Any = None) -> Any:
    """unsloth's attention's packed metadata: what `block_seq_info` computed before the block, else its own."""
    from unsloth.utils import hf_packed_attention

    given = kwargs.get(hf_packed_attention.BLOCK_VARLEN_KWARG)
    return given if given is not None else _ORIGINAL["get_packed_info_from_kwargs"](kwargs, device, position_ids)


def attention(*, config: Any, context: Any, Q: Any, K: Any, V: Any) -> Any:
    """unsloth's attention; inside a compiled block, a padding-free causal row as one flash varlen call."""
    import torch
    from unsloth.utils import hf_packed_attention

    given = context.seq_info
    one_flash_call = (
        torch.compiler.is_compiling()
        and given is not None
        and context.attention_mask is None
        and context.prefix_seg_info is None
        and context.is_causal
        and context.sliding_window is None
        and Q.shape[0] == 1
        and context.q_len == context.kv_seq_len
        and not (config.flash_varlen_kwargs or {}).get("softcap")
    )
    if not one_flash_call:
        return _ORIGINAL["run_attention"](config=config, context=context, Q=Q, K=K, V=V)
    # (1, heads, tokens, head dim) in, (1, tokens, heads, head dim) out; K/V heads grouped as they are
    out = hf_packed_attention._flash_varlen(Q, K, V, given[1], given[2], context.head_dim**-0.5, None)
    return out.view(context.bsz, context.q_len, context.n_heads, context.head_dim)


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of `model`, the modules that unsloth compiles one block each."""
    return [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]


def compiled_layers(model: Any) -> tuple[int, int]:
    """(decoder layers whose training forward ran compiled, decoder layers): `_block_compile` marks a layer's
    `_unsloth_block_checked` bit 2 once its grad-mode compiled call succeeded, and demotes a layer that failed to
    compile to the stock forward (`_unsloth_block_mode` 0)."""
    states = [layer.__dict__ for layer in decoder_layers(model)]
    compiled = [
        state for state in states if state.get("_unsloth_block_checked", 0) & 2 and state.get("_unsloth_block_mode")
    ]
    return len(compiled), len(states)


def recompile_reasons() -> dict[str, int]:
    """Why `torch.compile` compiled a function again in this process: each distinct first reason that dynamo recorded
    when a compiled graph's guards failed (`guard_failures`, kept whatever the log settings), and how often."""
    from collections import Counter

    from torch._dynamo.utils import guard_failures

    # each reason reads "<compile id>: <guard that failed>", the id differs from one recompile to the next
    lines = (reason.split(": ", 1)[-1].splitlines()[0] for failed in guard_failures.values() for reason in failed)
    reasons = (" ".join(line.split()) for line in lines)  # the guard's code, then its source after runs of spaces
    return dict(Counter(reasons).most_common())


def report(model: Any) -> list[str]:
    """After training: how many of `model`'s decoder layers trained compiled, and each reason to compile again (a
    slow run compiling on every micro-batch shows here)."""
    compiled, layers = compiled_layers(model)
    lines = [f"decoder layers that trained compiled (unsloth's block compile, CUDA only): {compiled} of {layers}"]
    return lines + [
        f"recompiled {count}x, guard failed: {reason[:300]}" for reason, count in recompile_reasons().items()
    ]


def wrapped(original: Any) -> Any:
    """`original` called through a function of this module (not `functools.wraps`: it would copy its module)."""

    def forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, hidden_states, *args, **kwargs)

    return forward
