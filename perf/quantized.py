"""Pre-quantized bitsandbytes 4-bit checkpoints of random weights (`perf.shapes`' 32B and 70B shapes, `--four-bit`
for any), as Hugging Face and unsloth publish their `*-bnb-4bit` repos (`FOUR_BIT`: NF4, the scales quantized again,
bf16 compute; config.json carries it as `quantization_config`), written a module at a time so that neither the bf16
model nor anything near it is ever in memory or on disk (`write_4bit`).

The model is built on the meta device; each module with weights is made on the GPU (else the CPU), initialized by
the model's own `_init_weights` (normal with std `initializer_range` for linear layers and embeddings, ones for
norms, zero biases) from the seeded stream, its linear layers but the output layer quantized and serialized by
bitsandbytes' own `Linear4bit` as transformers saves a 4-bit model (`linear_4bit`), the embeddings, output layer and
norms kept in bf16; then its weights are freed and it joins the shard being filled (safetensors files of up to
`SHARD_BYTES`, `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# how the 4-bit shapes are quantized: as unsloth's `*-bnb-4bit` repos (NF4, the absmax scales quantized again to 8
# bits, bf16 compute), written to config.json as transformers' BitsAndBytesConfig writes it
FOUR_BIT = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}
SHARD_BYTES = 4 * 10**9  # the largest safetensors file, as the bf16 build's save_pretrained(max_shard_size="4GB")


def write_4bit(model: Any, output: Path, device: str, shard_bytes: int = SHARD_BYTES) -> None:
    """Write `model`, built on the meta device, to `output` as a pre-quantized bitsandbytes 4-bit checkpoint
    (`FOUR_BIT`), a module at a time: made on `device`, initialized by the model's `_init_weights`, quantized and
    serialized (`linear_4bit`; the output layer, embeddings and norms as they are, bf16), copied to the shard being
    filled (`write_shards`) and freed again. Also config.json, with the `quantization_config`, and
    generation_config.json, as save_pretrained writes them."""
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(**FOUR_BIT)
    assert not model.config.tie_word_embeddings, "a tied output layer would be made and freed with its embedding"
    output_layer = model.get_output_embeddings()

    def states() -> Iterator[dict[str, Any]]:
        for name, module in model.named_modules():
            if next(module.parameters(recurse=False), None) is None:
                continue  # a container, or weightless (the rotary embedding's buffers are computed when loaded)
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                model._init_weights(module)
            if type(module) is torch.nn.Linear and module is not output_layer:
                state = linear_4bit(module, quantization)
            else:
                state = dict(module.named_parameters(recurse=False))
            yield {f"{name}.{key}": tensor.detach().to("cpu", copy=True) for key, tensor in state.items()}
            module.to_empty(device="meta", recurse=False)

    write_shards(states(), output, shard_bytes, model.num_parameters())
    model.config.quantization_config = quantization
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    model.config.save_pretrained(output)
    model.generation_config.save_pretrained(output)


def linear_4bit(linear: Any, quantization: Any) -> dict[str, Any]:
    """The state dict of bf16 `linear` quantized as transformers quantizes it for a 4-bit load: bitsandbytes'
    `Linear4bit` of `quantization`'s settings (`replace_with_bnb_linear`'s arguments), its weight quantized where it
    lies (CUDA or the CPU) by `Params4bit`, serialized by `Linear4bit._save_to_state_dict`: `weight` (the packed
    uint8 NF4 codes, two a byte), `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
    `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4` (the rest of the quant state, packed), `bias`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
        quantization.bnb_4bit_compute_dtype,
        compress_statistics=quantization.bnb_4bit_use_double_quant,
        quant_type=quantization.bnb_4bit_quant_type,
        quant_storage=quantization.bnb_4bit_quant_storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        compress_statistics=layer.weight.compress_statistics,
        quant_type=layer.weight.quant_type,
        quant_storage=layer.weight.quant_storage,
        module=layer,
    ).to(linear.weight.device)  # a Params4bit is quantized when moved to its device
    layer.bias = linear.bias
    return layer.state_dict()


def write_shards(states: Iterable[dict[str, Any]], output: Path, shard_bytes: int, parameters: int) -> None:
    """Write the tensors of `states`, each dict whole, into safetensors files of up to `shard_bytes` in `output`, as
    save_pretrained names them: `model.safetensors` if one is enough, else `model-00001-of-0000N.safetensors`... and
    `model.safetensors.index.json` (`parameters`, the bytes, which file holds each tensor). Holds one shard at a time.
    """
    from safetensors.torch import save_file

    files: list[tuple[Path, list[str]]] = []
    total = 0
    for shard in shards(states, shard_bytes):
        path = output / f"model-{len(files) + 1:05d}.safetensors"  # numbered "of N" once N is known
        save_file(shard, path, metadata={"format": "pt"})
        files.append((path, list(shard)))
        total += sum(tensor.nbytes for tensor in shard.values())
        del shard  # not kept while the next one fills
    if len(files) == 1:
        files[0][0].rename(output / "model.safetensors")
        return
    weight_map = {}
    for path, names in files:
        named = path.rename(path.with_name(f"{path.stem}-of-{len(files):05d}.safetensors"))
        weight_map |= dict.fromkeys(names, named.name)
    index = {"metadata": {"total_parameters": parameters, "total_size": total}, "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (output / "model.safetensors.index.json").write_text(text, encoding="utf-8")


def shards(states: Iterable[dict[str, Any]], limit: int) -> Iterator[dict[str, Any]]:
    """`states` merged into shards of up to `limit` bytes, each state whole (one larger than `limit` alone).

    `shards([{"a": 2 bytes}, {"b": 2 bytes}, {"c": 3 bytes}, {"d": 5 bytes}], 4)` -> `{"a", "b"}`, `{"c"}`, `{"d"}`.
    """
    shard: dict[str, Any] = {}
    size = 0
    for state in states:
        nbytes = sum(tensor.nbytes for tensor in state.values())
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard |= state
        size += nbytes
    if shard:
        yield shard
