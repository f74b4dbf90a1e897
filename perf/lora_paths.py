"""Speed experiments: the LoRA paths that `perf.train_speed`'s setups take (`take`), the train stage's and others.

`addmm_lora_forwards()` (the `lora_forward: addmm` setting): peft's LoRA layers compute `result + B(A(x)) * scale`,
which the compiled blocks run as a product with a full-size output, then a multiply and an add over that output
wherever the scale (alpha / r) is not 1 (session 26's reading of the compiled graph). unsloth rewrites their forward
as `torch.addmm(result, A(x), B^T, alpha=scale)`, the scale applied inside the one product, for the models it
compiles whole (`unsloth_zoo.compiler.patch_lora_forwards`); its Llama path does not call it. This calls it. The
compiled graph of one LoRA projection at scale 2 (r 16, alpha 32; inductor's post-grad graph on the CPU, session 27):
peft's forward writes the adapter's full-size product, multiplies it by 2 into another full-size tensor, then adds
the base product (`addmm`); its backward multiplies the full-size output gradient by 2 before the two rank-r products.
unsloth's forward is `mm` for the base, then `addmm` with the rank-r product, and its multiplies by 2 are on rank-r
tensors only: two full-size passes fewer forward, two fewer backward.

`pad_lora_products(model, inner)` (the `pad_rank` setting): a step with LoRA runs, per projection, products of inner
size r (the rank) whose output is as large as the projection's: (X A^T) B^T forward and (dY B) A into dX backward.
Session 25's profile found cuBLAS running them on slow cutlass kernels for r 4 and 16 (`perf.lora_products` times
them alone). Padding the inner size with zeros adds only zeros to each sum, so the result is the same up to the order
of rounding, and cuBLAS may choose other kernels. It pads on both paths a step can take:
- unsloth's fused LoRA functions (CUDA): its `addmm_` (`unsloth.kernels.utils`, and the copy `fast_lora` imported)
  pads a product whose inner size is under `inner`, keeping each operand's layout;
- peft's LoRA layers: each `lora_A` returns its rank-r output padded with zero columns to `inner`, and each `lora_B`
  takes it with its weight padded to match.
"""

from __future__ import annotations

import types
from typing import Any

_ORIGINAL: dict[str, Any] = {}  # unsloth's addmm_, once patched


def take(model: Any, compiled: list[str], settings: dict[str, Any]) -> list[str]:
    """After `get_peft_model`, the LoRA path a setup's `settings` name, and a line on each change made. `mlp` and
    `attention` run the MLP's and q/k/v's and o's LoRA through peft's layers (`peft`) or unsloth's fused functions
    (`fused`, which `get_peft_model` sets on CUDA); where neither is given, the train stage decides
    (`compiled_blocks.unfuse_lora`, in compiled blocks only). `lora_forward: addmm` gives peft's layers unsloth's
    addmm forward (`addmm_lora_forwards`) and `pad_rank` pads the LoRA products' inner size (`pad_lora_products`),
    which the stage does not."""
    from finetune.model import compiled_blocks

    if compiled and not {"mlp", "attention"} & settings.keys():  # the stage's choice
        mlps, attentions = compiled_blocks.unfuse_lora(model)
    else:  # as the setup says; unsloth's fused functions where it says nothing
        mlps = compiled_blocks.unfuse_lora_mlps(model) if settings.get("mlp") == "peft" else 0
        attentions = compiled_blocks.unfuse_lora_attention(model) if settings.get("attention") == "peft" else 0
    lines = [f"LoRA back to peft's layers from unsloth's fused functions: {mlps} MLPs, {attentions} attentions"]
    if settings.get("lora_forward") == "addmm":
        lines.append(f"peft's LoRA layers through unsloth's addmm forward: {addmm_lora_forwards()}")
    if settings.get("pad_rank"):
        lines.append(f"peft LoRA layers padded: {pad_lora_products(model, settings['pad_rank'])}")
    return lines


def padded_rows(matrix: Any, inner: int) -> Any:
    """`matrix` (k × n) with zero rows up to `inner`, in the layout it had (row-major, or a transposed view)."""
    import torch.nn.functional as F

    if matrix.is_contiguous():
        return F.pad(matrix, (0, 0, 0, inner - matrix.shape[0]))
    return F.pad(matrix.t(), (0, inner - matrix.shape[0])).t()


def padded_addmm(inner: int, original: Any) -> Any:
    """unsloth's `addmm_(out, A, B, alpha, beta)` with an inner size under `inner` zero-padded to it."""

    def addmm_(out: Any, A: Any, B: Any, alpha: Any = 1.0, beta: Any = 1.0) -> Any:
        if A.shape[1] < inner:
            import torch.nn.functional as F

            A, B = F.pad(A, (0, inner - A.shape[1])), padded_rows(B, inner)
        return original(out, A, B, alpha=alpha, beta=beta)

    return addmm_


def pad_lora_products(model: Any, inner: int) -> int:
    """Pad the inner size of `model`'s LoRA products to `inner` on unsloth's fused path and peft's layers (see above);
    returns how many peft LoRA layers it padded."""
    import torch.nn.functional as F
    import unsloth.kernels.fast_lora as fast_lora
    import unsloth.kernels.utils as kernel_utils

    if not _ORIGINAL:
        _ORIGINAL["addmm_"] = kernel_utils.addmm_
        kernel_utils.addmm_ = fast_lora.addmm_ = padded_addmm(inner, _ORIGINAL["addmm_"])

    def lora_a(self: Any, x: Any) -> Any:  # (…, r) out, zero columns up to `inner`
        return F.linear(x, F.pad(self.weight, (0, 0, 0, inner - self.weight.shape[0])))

    def lora_b(self: Any, z: Any) -> Any:  # (…, inner) in: the weight's columns padded to match
        return F.linear(z, F.pad(self.weight, (0, inner - self.weight.shape[1])), self.bias)

    pairs = [
        (layer.lora_A[name], layer.lora_B[name])
        for layer in model.modules()
        if hasattr(layer, "lora_A") and hasattr(layer, "lora_B")
        for name in layer.lora_A
        if layer.lora_A[name].weight.shape[0] < inner
    ]
    for a, b in pairs:
        a.forward, b.forward = types.MethodType(lora_a, a), types.MethodType(lora_b, b)
    return len(pairs)


def addmm_lora_forwards() -> bool:
    """peft's LoRA layer classes' forward as unsloth rewrites it (see above), for the whole process; returns whether
    peft's `Linear` now runs unsloth's."""
    from peft.tuners.lora.layer import Linear
    from unsloth.models._utils import torch_compile_options
    from unsloth_zoo.compiler import patch_lora_forwards

    patch_lora_forwards(torch_compile_options)  # skips a class already patched
    return Linear.forward.__name__ == "unsloth_forward"
