"""The `lora` and `train` sections: the adapter's settings for unsloth's `get_peft_model`, and the training's, which
pass straight through to TRL's `SFTConfig` (`training_arguments`) but for the few this project reads itself
(`STAGE_KEYS`). `check_names` refuses, before any weight loads, names that the model or transformers do not know.
"""

from __future__ import annotations

import math
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
        require(  # peft applies LoftQ only with init_lora_weights: loftq, which no setting passes: it would be ignored
            not self.loftq_config,
            f"lora.loftq_config has no effect here (LoftQ needs peft's init_lora_weights: loftq and a 16-bit base, "
            f"which this pipeline does not set): set it to null, got {self.loftq_config!r}",
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
        for key in ("learning_rate", "num_train_epochs", "weight_decay"):
            require(math.isfinite(getattr(self, key)), f"train.{key} must be a finite number, got {getattr(self, key)}")
        require(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        require(
            self.max_steps == -1 or self.max_steps >= 1, f"train.max_steps must be -1 or >= 1, got {self.max_steps}"
        )
        require(self.num_train_epochs > 0, f"train.num_train_epochs must be > 0, got {self.num_train_epochs}")
        require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32 - 1] (numpy's seeds), got {self.seed}")
        require(self.logging_steps >= 1, f"train.logging_steps must be >= 1, got {self.logging_steps}")
        require(  # a training with no logged loss has no curve and no train_loss to report
            self.max_steps == -1 or self.logging_steps <= self.max_steps,
            f"train.logging_steps ({self.logging_steps}) is above train.max_steps ({self.max_steps}): no training "
            "loss would be logged",
        )
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
    """Refuse, before any weight loads, a `lora.target_modules` entry that names no linear layer of the base model,
    a `train.optim` that transformers does not know, and a schedule it cannot run so (`check_schedule`)."""
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
    check_schedule(config)


# schedules that need transformers' lr_scheduler_kwargs (a minimum rate), which no setting passes
NEEDS_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")


def check_schedule(config: TrainConfig) -> None:
    """Refuse a `train.lr_scheduler_type` that transformers does not know or that needs what no setting gives: a
    minimum rate, or (`reduce_lr_on_plateau`) held-out losses during training (`train.eval_steps`)."""
    from transformers import SchedulerType

    known = [schedule.value for schedule in SchedulerType if schedule.value not in NEEDS_KWARGS]
    name = config.lr_scheduler_type
    require(
        name not in NEEDS_KWARGS,
        f"train.lr_scheduler_type {name!r} needs a minimum rate (transformers' lr_scheduler_kwargs), which no "
        f"setting gives; one of: {', '.join(known)}",
    )
    require(name in known, f"train.lr_scheduler_type {name!r} is not one of transformers': {', '.join(known)}")
    require(
        name != "reduce_lr_on_plateau" or config.eval_steps is not None,
        "train.lr_scheduler_type reduce_lr_on_plateau steps on the held-out loss: set train.eval_steps",
    )
