"""An experiment, the setup `project-auto-compiled` of `perf.train_speed`: padding-free batches through unsloth's
compiled decoder blocks.

unsloth 2026.10.9 compiles each decoder block as one region on CUDA (`unsloth/models/_block_compile.py`), but runs a
block eagerly whenever its call carries `packed_seq_lengths` on a forward of unsloth's own (a padding-free batch on
Llama or Qwen2), which would read the segment lengths on the host inside the region. On rows of one length the
compiled padded blocks were ~5 % faster per position than the eager padding-free ones (BENCHMARKS.md, session 20).
`compile_padding_free_blocks` lets padding-free batches into the region:
- each decoder layer class's forward is wrapped in a function of this module: `_block_compile` keeps eager only the
  forwards defined in `unsloth.models`;
- the hook that `_block_compile` calls eagerly before each compiled block (`hf_packed_attention.block_varlen_kwargs`,
  there for transformers' own forwards) returns the row's `(lengths, cu_seqlens, max_seqlen)`, computed there on the
  host once a micro-batch (unsloth caches them on the lengths tensor), cu_seqlens covering any pad tail, the segment
  count marked dynamic;
- inside the block, unsloth's attention takes them from that keyword instead of reading the lengths itself, and runs
  them as one call of aten's flash varlen kernel (unsloth's `_flash_varlen`, what its compiled blocks run for
  transformers' forwards): its own packed path would read the lengths on the host (`packed_segment_lengths`, a tuple
  of ints) and make a graph for each new set of lengths.
unsloth compiles no block on the CPU: there the wrapped forward runs as it is, and the setup trains as `project-auto`.
On the 8B shape (BENCHMARKS.md, session 21), before the last point, every layer trained compiled with the eager
losses, but the blocks compiled again on nearly every micro-batch, each time on a host cache of those packing helpers.
"""

from __future__ import annotations

from typing import Any


def compile_padding_free_blocks(model: Any) -> list[str]:
    """Patch unsloth so that `model`'s decoder blocks compile for padding-free batches too; call it after loading the
    base and before `get_peft_model`, which compiles the blocks. Returns the names of the classes wrapped."""
    import torch
    import unsloth.models.llama as llama  # first: unsloth.utils' modules import each other through it
    from unsloth.utils import hf_packed_attention, packing

    keyword = hf_packed_attention.BLOCK_VARLEN_KWARG
    read = packing.get_packed_info_from_kwargs
    run_attention = llama.run_attention
    flash_varlen = hf_packed_attention._flash_varlen

    def block_seq_info(layer: Any, hidden_states: Any, kwargs: dict[str, Any]) -> Any:  # eager, before a block
        info = read(kwargs, hidden_states.device)
        if info is None:
            return None
        cu_seqlens, max_seqlen = packing.cover_padded_cu_seqlens(info, hidden_states.shape[0] * hidden_states.shape[1])
        # the segment count changes every micro-batch: one graph for all of them, as unsloth marks its own
        for tensor in (kwargs["packed_seq_lengths"], info[0], cu_seqlens):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return info[0], cu_seqlens, int(max_seqlen)

    def seq_info(kwargs: dict[str, Any], device: Any, position_ids: Any = None) -> Any:  # in a block, or outside
        given = kwargs.get(keyword)
        return given if given is not None else read(kwargs, device, position_ids)

    def attention(*, config: Any, context: Any, Q: Any, K: Any, V: Any) -> Any:
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
            return run_attention(config=config, context=context, Q=Q, K=K, V=V)
        # (1, heads, tokens, head dim) in, (1, tokens, heads, head dim) out; K/V heads grouped as they are
        out = flash_varlen(Q, K, V, given[1], given[2], context.head_dim**-0.5, None)
        return out.view(context.bsz, context.q_len, context.n_heads, context.head_dim)

    hf_packed_attention.block_varlen_kwargs = block_seq_info
    llama.get_packed_info_from_kwargs = seq_info
    llama.run_attention = attention
    classes = {type(layer) for layer in decoder_layers(model)}
    for cls in classes:
        cls.forward = wrapped(cls.forward)
    return sorted(cls.__name__ for cls in classes)


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


def wrapped(original: Any) -> Any:
    """`original` called through a function of this module (not `functools.wraps`: it would copy its module)."""

    def forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, hidden_states, *args, **kwargs)

    return forward
