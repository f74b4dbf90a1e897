"""`auto` settings: the base model's precision, gradient checkpointing and the micro-batch, fitted to the GPU.

    model.load_in_4bit: auto                  16-bit base when its weights take at most 40 % of the GPU, else 4-bit;
                                              4-bit for a pre-quantized base (`*-bnb-4bit`), which has no other
    lora.use_gradient_checkpointing: auto     off when a micro-batch's activations fit without it, else "unsloth"
    train.micro_batch_size: auto              the largest divisor of the effective batch (per_device_train_batch_size
                                              x gradient_accumulation_steps) that fits; accumulation makes up the rest
    train.micro_batch_tokens: auto            instead of that: a process's whole share of a step as one micro-batch,
                                              run in passes of as many tokens as fit (`plan_by_tokens`)

None of them changes what is learnt per optimizer step: the effective batch, the data order and the loss are the
settings' own (the 16-bit base only removes the 4-bit quantization error). Memory is planned for the worst case, a
micro-batch of conversations all `max_seq_length` long (for `micro_batch_tokens`, a full pass), from the model's
shape (its config.json alone):
- weights: 2 bytes a parameter in 16-bit; in 4-bit, half a byte a linear weight plus 16-bit embeddings;
- activations kept for the backward pass, per token: 34 x hidden x layers bytes without checkpointing (the
  standard transformer count; measured 4.25 MiB a token on the 8B shape on an H100, unsloth's chunked loss
  included); with unsloth's offloaded checkpointing 64 x hidden bytes (measured 0.22 MiB) stay on the GPU. Through
  the compiled blocks (`compiled_blocks`) the 8B measured ~3.2 MiB a token with the seed's LoRA and ~4.6 MiB with
  LoRA on all seven projections, which keeps each projection's input for the adapter's gradient (passes of 24,666
  tokens on an H200: 91.4 and 126.7 GiB at the peak, BENCHMARKS.md sessions 26 and 27): over this estimate, within
  the share of the card left unplanned (USABLE_SHARE).
Without a GPU every `auto` takes the seed's choice: 4-bit, checkpointing "unsloth", the micro-batch as written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from finetune.config.params import require
from finetune.model.load import ModelConfig, base_config
from finetune.training.config import check_pass_length
from finetune.training.distributed import World, per_process

if TYPE_CHECKING:
    from finetune.training.config import LoraConfig, TrainConfig

GIB = 2**30
WEIGHTS_SHARE = 0.40  # a 16-bit base may take this share of the GPU; the rest is for activations
USABLE_SHARE = 0.85  # of the GPU's memory, planned for; the rest absorbs fragmentation and CUDA workspaces
RESERVED = 1.5 * GIB  # CUDA context, LoRA weights and optimizer state, kernels' scratch


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From a transformers config (or anything with the same attributes)."""
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def linear_parameters(self) -> int:
        """Weights of the attention and MLP projections: what 4-bit quantizes."""
        kv = self.hidden * self.kv_heads // self.heads
        return self.layers * (
            2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        )

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def weight_bytes(shape: Shape, four_bit: bool) -> float:
    if four_bit:  # NF4 weights with their absmax scales (~0.53 bytes), embeddings and output layer in 16 bits
        return 0.53 * shape.linear_parameters + 2 * shape.embedding_parameters
    return 2.0 * (shape.linear_parameters + shape.embedding_parameters)


def activation_bytes_per_token(shape: Shape, checkpointing: str | bool) -> float:
    return 64 * shape.hidden if checkpointing else 34 * shape.hidden * shape.layers


def load_in_4bit(setting: bool | str, shape: Shape, gpu_bytes: int | None) -> bool:
    """`auto`: 4-bit unless the 16-bit weights take at most WEIGHTS_SHARE of the GPU; true/false as written."""
    if setting != "auto":
        return bool(setting)
    return gpu_bytes is None or weight_bytes(shape, four_bit=False) > WEIGHTS_SHARE * gpu_bytes


@dataclass(frozen=True)
class Plan:
    use_gradient_checkpointing: str | bool
    per_device_train_batch_size: int
    gradient_accumulation_steps: int


def plan(
    shape: Shape,
    gpu_bytes: int | None,
    four_bit: bool,
    checkpointing: str | bool,
    micro_batch: str | None,
    per_device: int,
    accumulation: int,
    max_length: int,
) -> Plan:
    """Checkpointing and micro-batch for this GPU: no checkpointing if any micro-batch fits without it, then the
    largest micro-batch that fits. Settings that are not `auto` are kept; the effective batch always is.

    The largest is chosen to fill the card, not for a measured speed-up: the one comparison of two sizes with the
    same settings (8B shape, H100, BENCHMARKS.md session 3) gave 11,745 tokens/s for 8 in one pass and 12,440 for
    4 x 2; on an H200 the sizes chosen so ran at 15,625 (8B, 8 x 2) and 37,583 (1.5B, 16 in one pass: sessions 10
    and 11). Packing is not chosen here: it would change how many conversations a step holds and their order, for
    1-4 % (within the spread between machines).

    `plan(Shape(4096, 32, 14336, 32, 8, 128256, False), 80 * GIB, False, "auto", "auto", 2, 4, 2048)`
    -> `Plan(use_gradient_checkpointing=False, per_device_train_batch_size=4, gradient_accumulation_steps=2)`.
    """
    effective = per_device * accumulation
    if gpu_bytes is None:
        return Plan("unsloth" if checkpointing == "auto" else checkpointing, per_device, accumulation)
    room = USABLE_SHARE * gpu_bytes - RESERVED - weight_bytes(shape, four_bit)
    sizes = [m for m in range(effective, 0, -1) if effective % m == 0] if micro_batch == "auto" else [per_device]
    for option in [False, "unsloth"] if checkpointing == "auto" else [checkpointing]:
        for size in sizes:
            if size * max_length * activation_bytes_per_token(shape, option) <= room:
                return Plan(option, size, effective // size)
    # nothing fits by this estimate: the most frugal choice, and let the run show whether it does
    return Plan("unsloth" if checkpointing == "auto" else checkpointing, sizes[-1], effective // sizes[-1])


def plan_by_tokens(
    shape: Shape,
    gpu_bytes: int | None,
    four_bit: bool,
    checkpointing: str | bool,
    tokens: str | int,
    per_device: int,
    accumulation: int,
    max_length: int,
) -> tuple[Plan, int | None]:
    """Checkpointing and the passes of `train.micro_batch_tokens`: a process's share of a step in one micro-batch,
    run in passes of at most this many positions (`cut_by_tokens`), and that number. `auto`: as many as fit the
    room left by the weights, by the same estimate per token as `plan`, with no checkpointing if a whole
    `max_length` conversation fits without it; a number is kept (checkpointing off if it fits without). Where the
    data's conversations are shorter than `max_length`, a pass holds more of them than `plan`'s worst case
    allows. On the 8B shape a step's 16 conversations in one pass were 2.5 % faster than 8 x 2 with the compiled
    blocks (BENCHMARKS.md, session 25) and 2.6 % slower with the eager ones (session 22). Without a GPU, `auto`
    keeps the micro-batch as written, uncut, and checkpointing `auto` takes the seed's "unsloth".

    `plan_by_tokens(Shape(4096, 32, 14336, 32, 8, 128256, False), 80 * GIB, False, "auto", "auto", 2, 4, 2048)`
    -> `(Plan(use_gradient_checkpointing=False, per_device_train_batch_size=8, gradient_accumulation_steps=1),
    12418)`.
    """
    check_pass_length(tokens, max_length)
    options = [False, "unsloth"] if checkpointing == "auto" else [checkpointing]
    effective = per_device * accumulation
    if gpu_bytes is None:
        seed = "unsloth" if checkpointing == "auto" else checkpointing
        if tokens == "auto":
            return Plan(seed, per_device, accumulation), None
        return Plan(seed, effective, 1), int(tokens)
    room = USABLE_SHARE * gpu_bytes - RESERVED - weight_bytes(shape, four_bit)
    for option in options:
        fit = int(room // activation_bytes_per_token(shape, option)) if tokens == "auto" else int(tokens)
        if max_length <= fit and fit * activation_bytes_per_token(shape, option) <= room:
            return Plan(option, effective, 1), fit
    # nothing fits by this estimate: the most frugal choice, and let the run show whether it does
    return Plan(options[-1], effective, 1), max_length if tokens == "auto" else int(tokens)


def gpu_memory() -> int | None:
    """Bytes of memory of the GPU this process trains on, or None without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def model_shape(config: ModelConfig) -> Shape:
    """The base model's shape, from its config.json alone (no weights are read)."""
    return Shape.of(base_config(config))


def resolved(config: ModelConfig) -> ModelConfig:
    """`config` with `load_in_4bit: auto` decided for this machine (`load_in_4bit`). A pre-quantized 4-bit base
    (`prequantized`) loads in 4-bit whatever the GPU, and `false` is refused on one: unsloth would load it in 4-bit
    anyway, and the run would record 16 bits."""
    base = base_config(config)
    if prequantized(getattr(base, "quantization_config", None)):
        require(
            config.load_in_4bit is not False,
            f"model.load_in_4bit is false, but {config.model_name} is a pre-quantized 4-bit checkpoint (its "
            "config.json's quantization_config): it has no 16-bit weights to load; set it to true or auto",
        )
        return replace(config, load_in_4bit=True)
    if config.load_in_4bit != "auto":
        return config
    return replace(config, load_in_4bit=load_in_4bit("auto", Shape.of(base), gpu_memory()))


def prequantized(quantization: Any) -> bool:
    """Whether a config.json's `quantization_config` (a mapping, a transformers quantization config or None) is a
    bitsandbytes 4-bit one: the checkpoint holds 4-bit weights and no others, as unsloth's `*-bnb-4bit` repos and
    perf.shapes' 32B and 70B shapes do."""
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return (
        bool(quantization)
        and quantization.get("quant_method") == "bitsandbytes"
        and bool(quantization.get("load_in_4bit"))
    )


def fit_to_machine(
    model_config: ModelConfig, lora: LoraConfig, config: TrainConfig
) -> tuple[ModelConfig, LoraConfig, TrainConfig]:
    """The three configs with their `auto` settings decided for this machine (`plan`, or `plan_by_tokens` where
    `train.micro_batch_tokens` is set), the others as written."""
    model_config = resolved(model_config)
    tokens = config.micro_batch_tokens
    if tokens is None and lora.use_gradient_checkpointing != "auto" and config.micro_batch_size != "auto":
        return model_config, lora, config
    common = {
        "shape": model_shape(model_config),
        "gpu_bytes": gpu_memory(),
        "four_bit": bool(model_config.load_in_4bit),
        "checkpointing": lora.use_gradient_checkpointing,
        "per_device": config.per_device_train_batch_size,
        "accumulation": config.gradient_accumulation_steps,
        "max_length": model_config.max_seq_length,
    }
    if tokens is None:
        chosen = plan(**common, micro_batch=config.micro_batch_size)
    else:
        chosen, tokens = plan_by_tokens(**common, tokens=tokens)
    return (
        model_config,
        replace(lora, use_gradient_checkpointing=chosen.use_gradient_checkpointing),
        replace(
            config,
            per_device_train_batch_size=chosen.per_device_train_batch_size,
            gradient_accumulation_steps=chosen.gradient_accumulation_steps,
            micro_batch_tokens=tokens,
        ),
    )


def fit_tags(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> dict[str, Any]:
    """The settings that `fit_to_machine` decides, as the MLflow run is tagged with them (the passes' tokens where
    `train.micro_batch_tokens` cuts the micro-batch)."""
    tags = {
        "fit.load_in_4bit": model_config.load_in_4bit,
        "fit.use_gradient_checkpointing": lora.use_gradient_checkpointing,
        "fit.per_device_train_batch_size": config.per_device_train_batch_size,
        "fit.gradient_accumulation_steps": config.gradient_accumulation_steps,
    }
    if config.micro_batch_tokens is not None:
        tags["fit.micro_batch_tokens"] = config.micro_batch_tokens
    return tags


def split_batch_over_processes(config: TrainConfig, world: World) -> TrainConfig:
    """`config` with each of the world's processes taking its share of the effective batch (`per_process`)."""
    per_device, accumulation = per_process(
        config.per_device_train_batch_size, config.gradient_accumulation_steps, world.size
    )
    return replace(config, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)
