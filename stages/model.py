"""The `model` section: which base model train and evaluate load, and how (4-bit, sequence length, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from stages import fit
from stages.params import require

DTYPES = (None, "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ModelConfig:
    model_name: str  # Hub id or local folder of the base model
    revision: str | None  # Hub commit, tag or branch; null = the default branch
    max_seq_length: int  # longest sequence trained or scored, in tokens
    load_in_4bit: bool | str  # QLoRA: 4-bit NF4 base weights (bitsandbytes); auto = 16-bit where it fits
    dtype: str | None  # compute dtype; null = chosen from the hardware

    def __post_init__(self) -> None:
        require(bool(self.model_name.strip()), "model.model_name must not be empty")
        require(self.max_seq_length >= 16, f"model.max_seq_length must be >= 16, got {self.max_seq_length}")
        require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            self.load_in_4bit in (True, False, "auto"),
            f"model.load_in_4bit must be true, false or auto, got {self.load_in_4bit!r}",
        )


def gpu_memory() -> int | None:
    """Bytes of memory of the GPU this process trains on, or None without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def shape(config: ModelConfig) -> fit.Shape:
    """The base model's shape, from its config.json alone (no weights are read)."""
    from transformers import AutoConfig

    return fit.Shape.of(AutoConfig.from_pretrained(config.model_name, revision=config.revision))


def resolved(config: ModelConfig) -> ModelConfig:
    """`config` with `load_in_4bit: auto` decided for this machine (`stages.fit.load_in_4bit`)."""
    if config.load_in_4bit != "auto":
        return config
    return replace(config, load_in_4bit=fit.load_in_4bit("auto", shape(config), gpu_memory()))


def load_base(config: ModelConfig) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` with unsloth's `FastLanguageModel.from_pretrained`; `auto` 4-bit decided here."""
    import torch
    from unsloth import FastLanguageModel

    config = resolved(config)
    return FastLanguageModel.from_pretrained(
        model_name=config.model_name,
        revision=config.revision,
        max_seq_length=config.max_seq_length,
        load_in_4bit=config.load_in_4bit,
        dtype=getattr(torch, config.dtype) if config.dtype else None,
    )


def load_tokenizer(config: ModelConfig) -> Any:
    """The base model's tokenizer alone (with its chat template): what the data stages measure lengths with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model_name, revision=config.revision)


def mixed_precision() -> dict[str, bool]:
    """Trainer precision flags for this hardware: bf16 where the GPU has it, else fp16; none on the CPU."""
    import torch
    from unsloth import is_bfloat16_supported

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = bool(is_bfloat16_supported())
    return {"bf16": bf16, "fp16": not bf16}
