"""The `lora` and `train` sections: the adapter's settings for unsloth's `get_peft_model`, and the training's, which
pass straight through to TRL's `SFTConfig` (`training_arguments`) but for the few this project reads itself
(`STAGE_KEYS`). `check_names` refuses, before any weight loads, names that the model or transformers do not know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.config.params import require
from finetune.model.load import ModelConfig, linear_names
from finetune.training.distributed import processes


@dataclass(frozen=True)
class LoraConfig:
    r: int  # adapter rank
    target_modules: list[str] = field(default_factory=list)  # projections that get an adapter
    lora_alpha: int = 16  # scaling: the update is multiplied by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input
    bias: str = "none"  # which biases train: none, all or lora_only
    use_gradient_checkpointing: str | bool = "unsloth"  # "unsloth", true, false or auto (finetune.model.fit)
    random_state: int = 42  # seed of the adapter's initialisation
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    loftq_config: dict[str, Any] | None = None  # LoftQ initialisation; null = off

    def __post_init__(self) -> None:
        require(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        require(bool(self.target_modules), "lora.target_modules must name at least one module")
        require(self.lora_alpha > 0, f"lora.lora_alpha must be > 0, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(
            self.bias in ("none", "all", "lora_only"), f"lora.bias must be none, all or lora_only, got {self.bias!r}"
        )
        require(
            self.use_gradient_checkpointing in ("unsloth", True, False, "auto"),
            'lora.use_gradient_checkpointing must be "unsloth", true, false or auto, '
            f"got {self.use_gradient_checkpointing!r}",
        )


SAMPLING = ("random", "batch_rebalance", "group_by_length", "sequential")  # transformers' train_sampling_strategy


@dataclass(frozen=True)
class TrainConfig:
    per_device_train_batch_size: int  # sequences per forward pass
    gradient_accumulation_steps: int  # forward passes per optimizer step
    learning_rate: float  # peak learning rate
    max_steps: int  # optimizer steps; -1 = train num_train_epochs epochs
    num_train_epochs: float  # epochs, when max_steps is -1
    warmup_steps: int  # linear warm-up steps
    weight_decay: float  # AdamW weight decay
    optim: str  # transformers optimizer name
    lr_scheduler_type: str  # learning-rate schedule after warm-up
    logging_steps: int  # steps between logged metrics
    seed: int  # seed of data order and dropout
    eval_steps: int | None = None  # steps between held-out loss evaluations; null = none during training
    eval_rows: int = 100  # held-out conversations scored at each of those evaluations
    packing: bool = False  # TRL packing: conversations concatenated into max_seq_length rows (bfd)
    padding_free: bool | None = None  # batches without pad tokens; null = unsloth's choice (on where supported)
    save_steps: int | None = None  # steps between checkpoints that a killed run resumes from; null = none
    save_total_limit: int = 2  # checkpoints kept; at least 2, so one whole survives a kill during a save
    micro_batch_size: str | None = None  # auto = the largest split of the effective batch that fits (model.fit)
    micro_batch_tokens: str | int | None = None  # a step's batch in passes of at most this many positions; auto: fit
    devices: str | int = 1  # processes, one per leased GPU: auto = every visible GPU, a sweep's share in one (leases)
    train_sampling_strategy: str = "random"  # random, or batch_rebalance: each step's conversations dealt by length
    dataloader_num_workers: int = 0  # processes collating the next batches while the GPU trains; 0 = between steps

    def __post_init__(self) -> None:
        require(self.per_device_train_batch_size >= 1, "train.per_device_train_batch_size must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1")
        require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        require(
            self.max_steps == -1 or self.max_steps >= 1, f"train.max_steps must be -1 or >= 1, got {self.max_steps}"
        )
        require(self.num_train_epochs > 0, f"train.num_train_epochs must be > 0, got {self.num_train_epochs}")
        require(self.logging_steps >= 1, f"train.logging_steps must be >= 1, got {self.logging_steps}")
        require(
            self.eval_steps is None or self.eval_steps >= 1,
            f"train.eval_steps must be >= 1 or null, got {self.eval_steps}",
        )
        require(self.eval_rows >= 1, f"train.eval_rows must be >= 1, got {self.eval_rows}")
        require(
            self.save_steps is None or self.save_steps >= 1,
            f"train.save_steps must be >= 1 or null, got {self.save_steps}",
        )
        require(self.save_total_limit >= 2, f"train.save_total_limit must be >= 2, got {self.save_total_limit}")
        require(
            self.micro_batch_size in (None, "auto"),
            f"train.micro_batch_size must be null or auto, got {self.micro_batch_size!r}",
        )
        require(
            self.micro_batch_tokens in (None, "auto")
            or (
                isinstance(self.micro_batch_tokens, int)
                and not isinstance(self.micro_batch_tokens, bool)
                and self.micro_batch_tokens >= 1
            ),
            f"train.micro_batch_tokens must be null, auto or a number of tokens >= 1, got {self.micro_batch_tokens!r}",
        )
        require(
            self.micro_batch_tokens is None or self.micro_batch_size is None,
            "train.micro_batch_size and train.micro_batch_tokens both set: micro_batch_tokens runs a step's batch as "
            "one micro-batch in passes, micro_batch_size splits it by conversations; keep one, the other null",
        )
        require(
            self.dataloader_num_workers >= 0,
            f"train.dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}",
        )
        processes(self.devices, visible_gpus=0)  # auto or a number >= 1; checked against the GPUs at launch
        require(
            self.train_sampling_strategy in SAMPLING,
            f"train.train_sampling_strategy must be one of {', '.join(SAMPLING)}, got {self.train_sampling_strategy!r}",
        )


# `train.*` keys that this stage reads itself; the others are SFTConfig's
STAGE_KEYS = ("eval_rows", "micro_batch_size", "micro_batch_tokens", "devices")


def check_pass_length(tokens: str | int | None, max_length: int) -> None:
    """Refuse a `train.micro_batch_tokens` number below `model.max_seq_length`: a pass holds whole conversations."""
    require(
        not isinstance(tokens, int) or tokens >= max_length,
        f"train.micro_batch_tokens is {tokens}, below model.max_seq_length {max_length}: a pass must hold a whole "
        "conversation",
    )


def training_arguments(config: TrainConfig, max_length: int) -> dict[str, Any]:
    """SFTConfig's arguments from `train.*`: the settings pass straight through; evaluation and saves if asked.

    The data comes tokenized, cut to `model.max_seq_length` (`max_length`) and without unlearnable conversations, so
    TRL's own preparation (a Python pass over every conversation, again for each experiment) is skipped unless it
    packs. Evaluation batches hold as many conversations as a training micro-batch, or, where `micro_batch_tokens`
    cuts those into passes, as many `max_length` ones as a pass holds (evaluation's batches are not cut).
    """
    arguments = {key: value for key, value in asdict(config).items() if key not in STAGE_KEYS}
    arguments["save_strategy"] = "no" if config.save_steps is None else "steps"
    arguments["dataset_kwargs"] = {"skip_prepare_dataset": not config.packing}
    if config.eval_steps is None:
        return arguments | {"eval_strategy": "no"}
    rows = config.per_device_train_batch_size
    if isinstance(config.micro_batch_tokens, int):
        rows = max(1, min(rows, config.micro_batch_tokens // max_length))
    return arguments | {"eval_strategy": "steps", "per_device_eval_batch_size": rows}


def check_names(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> None:
    """Refuse, before any weight loads, a `lora.target_modules` entry that names no linear layer of the base model
    and a `train.optim` that transformers does not know."""
    from transformers.training_args import OptimizerNames

    layers = linear_names(model_config)
    for i, name in enumerate(lora.target_modules):
        require(
            name in layers,
            f"lora.target_modules[{i}] is {name!r}, which names no linear layer of {model_config.model_name}; "
            f"its layers: {', '.join(sorted(layers))}",
        )
    known = sorted(optimizer.value for optimizer in OptimizerNames)
    require(config.optim in known, f"train.optim {config.optim!r} is not one of transformers': {', '.join(known)}")
