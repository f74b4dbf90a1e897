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
  there for transformers' own forwards) returns unsloth's `(lengths, cu_seqlens, max_seqlen)` of the row, which
  `get_packed_info_from_kwargs` computes once a micro-batch (it caches them on the lengths tensor);
- inside the block, unsloth's attention takes them from that keyword instead of reading the lengths itself.
unsloth compiles no block on the CPU: there the wrapped forward runs as it is, and the setup trains as `project-auto`.
"""

from __future__ import annotations

from typing import Any


def compile_padding_free_blocks(model: Any) -> list[str]:
    """Patch unsloth so that `model`'s decoder blocks compile for padding-free batches too; call it after loading the
    base and before `get_peft_model`, which compiles the blocks. Returns the names of the classes wrapped."""
    import unsloth.models.llama as llama  # first: unsloth.utils' modules import each other through it
    from unsloth.utils import hf_packed_attention, packing

    keyword = hf_packed_attention.BLOCK_VARLEN_KWARG
    read = packing.get_packed_info_from_kwargs

    def block_seq_info(layer: Any, hidden_states: Any, kwargs: dict[str, Any]) -> Any:  # eager, before a block
        return read(kwargs, hidden_states.device)

    def seq_info(kwargs: dict[str, Any], device: Any, position_ids: Any = None) -> Any:  # in a block, or outside
        given = kwargs.get(keyword)
        return given if given is not None else read(kwargs, device, position_ids)

    hf_packed_attention.block_varlen_kwargs = block_seq_info
    llama.get_packed_info_from_kwargs = seq_info
    classes = {type(module) for module in model.modules() if type(module).__name__.endswith("DecoderLayer")}
    for cls in classes:
        cls.forward = wrapped(cls.forward)
    return sorted(cls.__name__ for cls in classes)


def wrapped(original: Any) -> Any:
    """`original` called through a function of this module (not `functools.wraps`: it would copy its module)."""

    def forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, hidden_states, *args, **kwargs)

    return forward
