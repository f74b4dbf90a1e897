"""Random-weight models of the real distills' shapes: the same compute per token as the real models, no download.

    python -m perf.shapes llama-8b /tmp/llama-8b               # DeepSeek-R1-Distill-Llama-8B's shape, bf16
    python -m perf.shapes qwen-32b /tmp/qwen-32b               # pre-quantized 4-bit, as SHAPES stores it (disk)
    python -m perf.shapes tiny /tmp/tiny-4bit --four-bit       # any shape pre-quantized 4-bit

bf16: the whole model built by `from_config` (on the GPU if there is one) and written by `save_pretrained`.

Pre-quantized 4-bit (a shape's `"stored": "4-bit"`, or `--four-bit`): a bitsandbytes checkpoint as Hugging Face and
unsloth publish their `*-bnb-4bit` repos, written a module at a time by `perf.quantized.write_4bit` (how: there).
The values are another draw than the bf16 build's (the same scheme): the same speed, not the same weights. On disk
the 32B takes ~19 GB and the 70B ~40 GB, where bf16 would take 66 GB and 141 GB (a lent H200 machine has 64 GB);
there `model.load_in_4bit: auto` picks 4-bit for both anyway (their bf16 weights are over 40 % of the card). Such a
folder loads in 4-bit, `auto` too, and `load_in_4bit: false` is refused (`finetune.model.fit.resolved`).

The tokenizer is the demo's (trained on the embedded sample, DeepSeek's special tokens and chat template); its
ids are a subset of the model's vocabulary, which keeps the real size so that the output layer costs what it does.
Prints the shape as written to the folder's config.json, and the parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from perf.quantized import SHARD_BYTES, write_4bit

SHAPES = {
    # a few hundred thousand parameters: for trying the speed scripts on the CPU (their smoke tests use it)
    "tiny": {
        "architecture": "llama",
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "vocab_size": 1024,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Llama-8B (Llama-3.1-8B), 8.03 B parameters
    "llama-8b": {
        "architecture": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B), 1.78 B parameters
    "qwen-1.5b": {
        "architecture": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B), 7.62 B parameters
    "qwen-7b": {
        "architecture": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B), 14.8 B parameters
    "qwen-14b": {
        "architecture": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B), 32.8 B parameters: 66 GB in bf16, over a lent H200 machine's disk
    # (64 GB); stored pre-quantized, ~19 GB
    "qwen-32b": {
        "stored": "4-bit",
        "architecture": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    # DeepSeek-R1-Distill-Llama-70B (Llama-3.3-70B-Instruct), 70.6 B parameters: 141 GB in bf16, more than the
    # 64 GB disk of a lent H200 machine (and its 128 GB of memory); stored pre-quantized, ~40 GB
    "llama-70b": {
        "stored": "4-bit",
        "architecture": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}
SAMPLE = Path("data/sample/finance_instruct_sample.jsonl")  # the demo's sample, relative to the project root


def build(
    shape: str,
    output: Path,
    corpus: Path,
    seed: int = 0,
    four_bit: bool | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write a random-weight model of `shape` and the demo's tokenizer to `output` (on the GPU if there is one):
    pre-quantized 4-bit if `four_bit` (by default as SHAPES stores the shape, `stored_4bit`; `perf.quantized`) in
    files of up to `shard_bytes`, else bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from demo.tiny_model import corpus_tokenizer

    four_bit = stored_4bit(shape) if four_bit is None else four_bit
    tokenizer = corpus_tokenizer(corpus)
    config = shape_config(shape, tokenizer)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta" if four_bit else device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    output.mkdir(parents=True, exist_ok=True)
    if four_bit:
        write_4bit(model, output, device, shard_bytes)
    else:
        model.save_pretrained(output, max_shard_size="4GB")
    tokenizer.save_pretrained(output)
    print(f"{shape}: {described(output)}, {model.num_parameters():,} parameters -> {output}", flush=True)


def stored_4bit(shape: str) -> bool:
    """Whether `shape` is written pre-quantized 4-bit unless asked otherwise (its SHAPES entry's `stored`)."""
    return SHAPES[shape].get("stored") == "4-bit"


def shape_config(shape: str, tokenizer: Any = None) -> Any:
    """The transformers config of `shape` (bf16, 4,096 positions), with `tokenizer`'s special token ids if given."""
    from transformers import AutoConfig

    spec = {key: value for key, value in SHAPES[shape].items() if key != "stored"}
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad") if tokenizer}
    return AutoConfig.for_model(spec.pop("architecture"), **spec, **ids, max_position_embeddings=4096, dtype="bfloat16")


def parameters(shape: str) -> int:
    """The parameter count of `shape`, from a model built on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape_config(shape)).num_parameters()


def described(model_dir: Path) -> str:
    """The shape of the model in `model_dir`, read from its config.json: what a speed script's table header shows.

    `described(Path("/tmp/tiny"))` -> `"llama, hidden 64, 2 layers, 4 heads (1 key/value), MLP 224, vocabulary 1,024"`,
    followed by `", pre-quantized 4-bit (NF4)"` for a pre-quantized folder (`finetune.model.fit.prequantized`: it
    loads in 4-bit, `auto` too).
    """
    from finetune.model.fit import prequantized

    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    stored = quantization.get("bnb_4bit_quant_type", "").upper()
    return (
        f"{config['model_type']}, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads ({config['num_key_value_heads']} key/value), "
        f"MLP {config['intermediate_size']}, vocabulary {config['vocab_size']:,}"
        + (f", pre-quantized 4-bit ({stored})" if prequantized(quantization) else "")
    )


def ensure(shape: str, model_dir: Path, root: Path, env: dict[str, str]) -> None:
    """Build the model of `shape` into `model_dir` (`python -m perf.shapes`, its own process) unless it is there."""
    if not (model_dir / "config.json").exists():
        command = [sys.executable, "-m", "perf.shapes", shape, str(model_dir), "--corpus", str(root / SAMPLE)]
        subprocess.run(command, check=True, env=env, cwd=root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--corpus", type=Path, default=SAMPLE, help="JSONL rows the tokenizer is trained on")
    parser.add_argument(
        "--four-bit",
        action="store_true",
        default=None,
        help="write it pre-quantized 4-bit (bitsandbytes NF4); the default for qwen-32b and llama-70b (disk)",
    )
    args = parser.parse_args(argv)
    build(args.shape, args.output, args.corpus, four_bit=args.four_bit)


if __name__ == "__main__":
    main()


def child_environment(root: Path, work: Path) -> dict[str, str]:
    """The environment of a speed script's children: the project on the path, a fresh MLflow store in `work`, and
    none of the caller's other MLflow variables (an experiment or run id of another store would be looked up in this
    one, and refused)."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return inherited | {"PYTHONPATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}


def integers(text: str) -> list[int]:
    """A speed script's flag of comma-separated numbers (`--processes`, `--batches`): `"1,2"` -> `[1, 2]`."""
    return [int(number) for number in text.split(",")]


def passed_on(argv: list[str] | None, params: Path, work: Path) -> list[str]:
    """A speed script's own arguments for the children it starts, with the settings file and the work folder as
    absolute paths: the children read the same, wherever they start."""
    return [*(argv if argv is not None else sys.argv[1:]), "--params", str(params.resolve()), "--work", str(work)]
