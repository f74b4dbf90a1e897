"""train: QLoRA fine-tuning of the base model on the tokenized conversations with TRL's SFTTrainer.

    python -m stages.train --data data/tokenized --adapter models/adapter --checkpoints models/checkpoints \
        --metrics metrics/train.json --plot metrics/train_loss.csv --eval-plot metrics/eval_loss.csv

A recipe, top to bottom: the token ids and labels the tokenize stage wrote (nothing is encoded here); the
checkpoint to resume from, if a run of the same settings and data was killed; the MLflow run; the base model from
unsloth's `FastLanguageModel.from_pretrained` and the LoRA adapter from its `get_peft_model` with every `lora.*`
setting; TRL's SFTTrainer; then the adapter, the metrics and the loss curves, saved and reported.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

from stages import checkpoints, fit, params
from stages.chat import PROBE, PROBE_FILE, Chat, ChatConfig
from stages.distributed import World, launched, per_process, processes, restart_under_launcher, several_nodes
from stages.files import file_hash, write_csv
from stages.model import ModelConfig, linear_names, load_base, mixed_precision, record_precision
from stages.params import require
from stages.tracking import (
    TrackingConfig,
    adapter_digest,
    git_commit,
    lock_hashes,
    log_data_inputs,
    log_settings,
    register_adapter,
    report,
    run_name,
    store_root,
    tracking_uri,
    use_experiment,
)

log = logging.getLogger("train")

LOSS_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "padding_share")
EVAL_LOSS_COLUMNS = ("step", "eval_loss")
DATA_TAGS = ("data/raw", "data/sharegpt", "data/standardized", "data/tokenized")  # dvc.lock hashes tagged on the run


@dataclass(frozen=True)
class LoraConfig:
    r: int  # adapter rank
    target_modules: list[str] = field(default_factory=list)  # projections that get an adapter
    lora_alpha: int = 16  # scaling: the update is multiplied by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input
    bias: str = "none"  # which biases train: none, all or lora_only
    use_gradient_checkpointing: str | bool = "unsloth"  # "unsloth", true, false or auto (stages.fit)
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
    micro_batch_size: str | None = None  # auto = the largest split of the effective batch the GPU holds (stages.fit)
    devices: str | int = 1  # processes, one per GPU: auto = every visible GPU (stages.distributed)
    train_sampling_strategy: str = "random"  # random, or batch_rebalance: each step's conversations dealt by length

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
        processes(self.devices, visible_gpus=0)  # auto or a number >= 1; checked against the GPUs at launch
        require(
            self.train_sampling_strategy in SAMPLING,
            f"train.train_sampling_strategy must be one of {', '.join(SAMPLING)}, got {self.train_sampling_strategy!r}",
        )


# `train.*` keys that this stage reads itself; the others are SFTConfig's
STAGE_KEYS = ("eval_rows", "micro_batch_size", "devices")


def loss_rows(log_history: list[dict[str, float]], columns: tuple[str, ...] = LOSS_COLUMNS) -> list[dict[str, float]]:
    """The records of a Trainer's `log_history` that hold `columns[1]`, for the loss plots.

    `[{"loss": 2.0, "step": 1, "learning_rate": 1e-4, "grad_norm": 0.5}, {"train_runtime": 3.0, "step": 1}]`
    -> `[{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5}]`
    """
    return [{key: entry.get(key) for key in columns} for entry in log_history if columns[1] in entry]


def logged_mean(rows: list[dict[str, float]], key: str) -> float:
    """Mean of `key` over the logged steps that hold it: `logged_mean([{"loss": 1.0}, {"loss": 3.0}], "loss")` = 2."""
    return mean(row[key] for row in rows if row.get(key) is not None)


def training_arguments(config: TrainConfig) -> dict[str, Any]:
    """SFTConfig's arguments from `train.*`: the settings pass straight through; evaluation and saves if asked.

    The data comes tokenized, cut to `model.max_seq_length` and without unlearnable conversations, so TRL's own
    preparation (a Python pass over every conversation, again for each experiment) is skipped unless it packs.
    """
    arguments = {key: value for key, value in asdict(config).items() if key not in STAGE_KEYS}
    arguments["save_strategy"] = "no" if config.save_steps is None else "steps"
    arguments["dataset_kwargs"] = {"skip_prepare_dataset": not config.packing}
    if config.eval_steps is None:
        return arguments | {"eval_strategy": "no"}
    return arguments | {"eval_strategy": "steps", "per_device_eval_batch_size": config.per_device_train_batch_size}


def deal(indices: list[int], lengths: list[int], ranks: int, slots: int) -> list[list[list[int]]]:
    """One optimizer step's conversations as `ranks` x `slots` micro-batches of near-equal tokens: longest first,
    each to the micro-batch with the fewest tokens so far (every one gets one, given as many conversations); then
    the heaviest `ranks` micro-batches are the first slot of each process, the next ones the second, and so on.
    For padding-free batches, whose cost is their tokens: transformers' own split balances padded batches, which
    left the two GPUs 9-18 % apart on the real length mix where this leaves them 0.6 % apart (BENCHMARKS.md).

    `deal([0, 1, 2, 3], [9, 1, 5, 4], ranks=2, slots=1)` -> `[[[0, 1]], [[2, 3]]]` (10 tokens each).
    """
    count = ranks * slots
    batches: list[list[int]] = [[] for _ in range(count)]
    tokens = [0] * count
    for index, length in sorted(zip(indices, lengths, strict=True), key=lambda pair: (-pair[1], pair[0])):
        lightest = min(range(count), key=lambda batch: (tokens[batch], batch))
        batches[lightest].append(index)
        tokens[lightest] += length
    heaviest = sorted(range(count), key=lambda batch: (-tokens[batch], batch))
    return [[batches[heaviest[slot * ranks + rank]] for slot in range(slots)] for rank in range(ranks)]


def project_trainer(trainer_class: type) -> type:
    """`trainer_class`, adding to each training log the tokens/s and the share of padding since the last log,
    and resuming a checkpoint with the adapter in the dtype that unsloth's `get_peft_model` gave it.

    Tokens are the non-padding positions of the training batches (all of a padding-free batch), summed over every
    process; padding is the share of positions that are not tokens; evaluation batches and time are left out. They
    are counted as the Trainer's `include_num_input_tokens_seen` counts them, but added up on the device and read
    once per log (and before each checkpoint, which keeps the count), where the Trainer's own count reads them back
    after every micro-batch: a host synchronisation that drained the GPU's queue each time (BENCHMARKS.md).
    """

    class ProjectTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def _load_from_checkpoint(self, checkpoint: str, model: Any = None) -> None:
            # peft loads a saved adapter in float32 (autocast_adapter_dtype); unsloth trains it in the model's
            # 16-bit dtype. Without the cast back, a resumed run would go on in other precision than it started.
            dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(checkpoint, model)
            for name, parameter in self.model.named_parameters():
                if name in dtypes and parameter.dtype != dtypes[name]:
                    parameter.data = parameter.data.to(dtypes[name])

        _pending: Any = 0  # this process's tokens since the last count: a device tensor for batches with padding
        _pending_positions = 0  # this process's positions since the last count, padding included (host-side numel)
        _tokens = 0  # every process's tokens since the last log
        _positions = 0  # every process's positions since the last log
        _since: float | None = None

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self._since = self._since or time.perf_counter()
            return super().training_step(model, inputs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            self._pending = self._pending + (mask.sum() if mask is not None else ids.numel())
            self._pending_positions += ids.numel()

        def _count_tokens(self) -> None:
            """Add the tokens and positions since the last count, summed over the processes, to the run's count
            (`state.num_input_tokens_seen`, kept in checkpoints) and to this log interval's. One read, on every
            process alike (it is a collective)."""
            import torch

            device = self.args.device
            local = torch.stack([torch.as_tensor(n, device=device) for n in (self._pending, self._pending_positions)])
            tokens, positions = self.accelerator.reduce(local.to(torch.int64), reduction="sum").tolist()
            self.state.num_input_tokens_seen += tokens
            self._tokens, self._positions = self._tokens + tokens, self._positions + positions
            self._pending, self._pending_positions = 0, 0

        def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            self._count_tokens()  # the checkpoint's state holds the count a resumed run goes on from
            super()._save_checkpoint(*args, **kwargs)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            self._count_tokens()
            if "loss" in logs and self._positions and self._since is not None:
                elapsed = time.perf_counter() - self._since
                padding = 1 - self._tokens / self._positions
                logs = logs | {"tokens_per_second": self._tokens / elapsed, "padding_share": padding}
                self._tokens, self._positions = 0, 0
                self._since = time.perf_counter()
            super().log(logs, *args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            # `batch_rebalance`: transformers' sampler (the same conversations per step on every process, shuffled
            # with the run's seed, not its fixed 42), lengths from the Arrow offsets (it reads every row in Python,
            # on every process); padding-free batches cost their tokens, so they are dealt by tokens (`deal`)
            if self.args.train_sampling_strategy != "batch_rebalance":
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import BatchRebalanceSampler

            class TokenSampler(BatchRebalanceSampler):
                def _assign(self, indices: list[int], lengths: list[int]) -> list[list[list[int]]]:
                    return deal(indices, lengths, self.dp_size, self.grad_accum)

            rows = train_dataset if train_dataset is not None else self.train_dataset
            sampler = TokenSampler if self.args.padding_free else BatchRebalanceSampler
            return sampler(
                lengths=token_counts(rows).to_pylist(),
                effective_batch_size=self.args.train_batch_size
                * self.args.gradient_accumulation_steps
                * self.args.world_size,
                dp_size=self.args.world_size,
                grad_accum=self.args.gradient_accumulation_steps,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                rank=self.args.process_index,
                drop_last=self.args.dataloader_drop_last,
            )

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = super().evaluate(*args, **kwargs)
            if self._since is not None:  # evaluation time is not training time
                self._since += time.perf_counter() - start
            return result

    return ProjectTrainer


def token_counts(rows: Any) -> Any:
    """The number of tokens of each of the tokenized `rows` (a pyarrow array), read from the Arrow offsets."""
    import pyarrow.compute as pc

    return pc.list_value_length(rows.with_format("arrow")["input_ids"])


def attest_cut(rows: Any, max_length: int) -> None:
    """Check that every row of the tokenized `rows` has at most `max_length` tokens (the tokenize stage cuts them
    there), and say so to unsloth: without its `_unsloth_truncated_to` mark it turns padding-free batching off for
    any dataset that is already tokenized, since it cannot cut the rows itself (on the 8B shape: 27.8 % of every
    batch was padding, BENCHMARKS.md)."""
    import pyarrow.compute as pc

    lengths = token_counts(rows)
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > max_length:
        row = pc.index(lengths, longest).as_py()
        raise ValueError(
            f"row {row} of the tokenized data has {longest} tokens, more than model.max_seq_length {max_length}: "
            "the tokenize stage cut it at another length; rerun it (dvc repro)"
        )
    rows._unsloth_truncated_to = max_length


def finite_adapter(model: Any) -> bool:
    """Whether every trainable (adapter) weight of `model` is finite: one check on the device, one sync."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(torch.stack([torch.isfinite(p).all() for p in trainable]).all()) if trainable else True


def diverged(step: int, what: str, config: TrainConfig) -> FloatingPointError:
    """The error that ends a diverged training, saying what to change."""
    return FloatingPointError(
        f"training diverged at step {step}: {what}. No adapter is written from these weights; the complete "
        f"checkpoints before this step are kept. Lower train.learning_rate ({config.learning_rate}) or raise "
        "train.warmup_steps, then dvc repro"
    )


def make_trainer(
    model: Any,
    tokenizer: Any,
    train_set: Any,
    model_config: ModelConfig,
    config: TrainConfig,
    output_dir: Path,
    eval_set: Any = None,
) -> Any:
    """TRL's SFTTrainer over tokenized conversations (`input_ids`, `labels`), as the tokenize stage writes them.

    The `train.*` settings pass straight through; precision follows the hardware; per-step metrics go to the
    active MLflow run; checkpoints go to `output_dir`, each marked complete once written (`stages.checkpoints`).
    """
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class MarkComplete(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                checkpoints.mark_complete(output_dir, state.global_step)

    class StopDiverged(TrainerCallback):
        # a non-finite loss or gradient norm ends the training (every process sees the same gathered values), and no
        # checkpoint is written from non-finite adapter weights: the complete ones before stay, to resume from
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
            if bad or self.broken:
                what = [f"{k} {v}" for k, v in bad.items()] + (["adapter weights not finite"] if self.broken else [])
                raise diverged(state.global_step, ", ".join(what), config)

        broken = False  # the adapter's weights went non-finite: no checkpoint of them, the log says why

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if control.should_save and not finite_adapter(model):
                control.should_save, self.broken = False, True
                if not control.should_log:
                    raise diverged(state.global_step, "adapter weights not finite", config)

    if config.eval_steps is not None and eval_set is None:
        raise ValueError("train.eval_steps is set but no held-out conversations were given")
    for rows in (train_set, eval_set):
        if rows is not None:
            attest_cut(rows, model_config.max_seq_length)
    return project_trainer(SFTTrainer)(
        model=model,
        processing_class=tokenizer,
        train_dataset=train_set,
        eval_dataset=eval_set if config.eval_steps is not None else None,
        args=SFTConfig(
            output_dir=str(output_dir),
            max_length=model_config.max_seq_length,
            report_to=["mlflow"],
            # `num_input_tokens_seen` in the logs and checkpoints: non-padding tokens, counted by `project_trainer`
            include_num_input_tokens_seen="non_padding",
            logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (StopDiverged ends the training)
            # several processes: every LoRA weight gets a gradient, so DDP need not search the graph for unused ones
            ddp_find_unused_parameters=False if World.from_environ(dict(os.environ)).size > 1 else None,
            **mixed_precision(),
            **training_arguments(config),
        ),
        callbacks=[MarkComplete(), StopDiverged()],
    )


def read_tokenized(data: Path, eval_rows: int) -> tuple[Any, Any]:
    """The training conversations and the first `eval_rows` held-out ones, as the tokenize stage wrote them:
    memory-mapped Arrow files, read without a copy (by every rank alike)."""
    from datasets import Dataset

    columns = ["input_ids", "labels"]
    train_set = Dataset.from_file(str(data / "train.arrow")).select_columns(columns)
    held_out = Dataset.from_file(str(data / "eval.arrow")).select_columns(columns)
    return train_set, held_out.select(range(min(eval_rows, len(held_out))))


def check_encoding(chat: Chat, data: Path) -> None:
    """Fail unless this model's tokenizer and chat settings encode as the tokenize stage did: the token ids were
    made with `AutoTokenizer`, the model's tokenizer comes from unsloth's loader."""
    expected = json.loads((data / PROBE_FILE).read_text(encoding="utf-8"))["input_ids"]
    found = chat.encode(PROBE)[0]
    require(
        found == expected,
        f"{data} was encoded by another tokenizer or chat template than this model's: the probe conversation is "
        f"{expected[:12]}... there and {found[:12]}... here; rerun the tokenize stage (dvc repro)",
    )


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


def fitted(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> tuple[Any, Any, Any]:
    """The three configs with their `auto` settings decided for this machine (`stages.fit`), the others as written."""
    model_config = fit.resolved(model_config)
    if lora.use_gradient_checkpointing != "auto" and config.micro_batch_size != "auto":
        return model_config, lora, config
    chosen = fit.plan(
        fit.model_shape(model_config),
        fit.gpu_memory(),
        four_bit=bool(model_config.load_in_4bit),
        checkpointing=lora.use_gradient_checkpointing,
        micro_batch=config.micro_batch_size,
        per_device=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps,
        max_length=model_config.max_seq_length,
    )
    return (
        model_config,
        replace(lora, use_gradient_checkpointing=chosen.use_gradient_checkpointing),
        replace(
            config,
            per_device_train_batch_size=chosen.per_device_train_batch_size,
            gradient_accumulation_steps=chosen.gradient_accumulation_steps,
        ),
    )


def shared_out(config: TrainConfig, world: World) -> TrainConfig:
    """`config` with each of the world's processes taking its share of the effective batch (`per_process`)."""
    per_device, accumulation = per_process(
        config.per_device_train_batch_size, config.gradient_accumulation_steps, world.size
    )
    return replace(config, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)


def visible_gpus() -> int:
    """The CUDA GPUs this process may use (`CUDA_VISIBLE_DEVICES` applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fit_tags(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> dict[str, Any]:
    """The settings that `fitted` decides, as the MLflow run is tagged with them."""
    return {
        "fit.load_in_4bit": model_config.load_in_4bit,
        "fit.use_gradient_checkpointing": lora.use_gradient_checkpointing,
        "fit.per_device_train_batch_size": config.per_device_train_batch_size,
        "fit.gradient_accumulation_steps": config.gradient_accumulation_steps,
    }


def batching_tags(args: Any, model_config: ModelConfig) -> dict[str, str]:
    """How the trainer lays conversations out in its batches and runs their attention, as the MLflow run is tagged:
    `packed` rows (TRL's bfd), `padding-free` batches (whole conversations in one row, no pad token) or `padded`
    ones; attention `flash-varlen` (one call of torch's flash kernel per layer over a row's conversations, in 16 bits:
    `stages.model.flash_varlen`) or `sdpa` (PyTorch's scaled_dot_product_attention, per run of equal lengths)."""
    import torch

    from stages.model import flash_varlen

    layout = "packed" if args.packing else "padding-free" if args.padding_free else "padded"
    sixteen_bit = model_config.dtype != "float32"  # flash has no float32 kernel
    flash = layout != "padded" and sixteen_bit and torch.cuda.is_available() and flash_varlen()
    return {"fit.batching": layout, "fit.attention": "flash-varlen" if flash else "sdpa"}


# --- the MLflow run: opened (or continued) at the start of a training, given the adapter at its end


def run_status(run_id: str) -> str | None:
    """The MLflow run's status (RUNNING, FINISHED, FAILED, KILLED), or None if the store does not hold it."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None


@contextlib.contextmanager
def training_run(
    tracking: TrackingConfig,
    folder: Path,
    resume: Path | None,
    settings: dict[str, Any],
    files: dict[str, Path],
    digests: dict[str, str],
    environ: dict[str, str],
) -> Iterator[Any]:
    """The MLflow run of this training, in the store at the repo root: a resumed training continues the run its
    killed attempt opened; a run left RUNNING by a kill with nothing to resume is marked KILLED. It carries the
    settings, the data (dataset inputs with DVC's hashes, the `dvc.lock` tags) and the commit, and ends FAILED if
    the training raises."""
    import mlflow

    root = store_root(environ, Path.cwd())
    use_experiment(tracking_uri(environ, root), tracking.experiment_name, root / "mlartifacts")
    commit = git_commit(Path.cwd())
    earlier = checkpoints.run_id(folder)
    status = run_status(earlier) if earlier is not None else None
    if resume is None and status == "RUNNING":  # killed (a failed run was marked FAILED as it failed)
        mlflow.MlflowClient().set_terminated(earlier, "KILLED")
    if resume is None or status is None:  # nothing of it is reused, or its store was deleted: a new run
        earlier = None
    name = None if earlier else run_name(environ, commit)
    mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_seconds)
    with mlflow.start_run(run_id=earlier, run_name=name, log_system_metrics=True) as run:
        checkpoints.remember_run(folder, run.info.run_id)
        locked = {f"dvc_lock.{path}": md5 for path, md5 in lock_hashes(Path("dvc.lock")).items() if path in DATA_TAGS}
        tags = {"git_commit": commit, "dvc_exp_name": environ.get("DVC_EXP_NAME", ""), "stage": "train"}
        log_settings(settings, tags | locked | ({"resumed_from": resume.name} if resume else {}))
        if resume is None:
            log_data_inputs(files, digests)
        yield run


@contextlib.contextmanager
def machine_metrics(run: Any, world: World, tracking: TrackingConfig, environ: dict[str, str]) -> Iterator[None]:
    """On several machines, the first process of each machine but rank 0's logs that machine's GPU, CPU and memory
    use into the training's run, as `system/node<N>/...` (rank 0's run logs its own machine's as `system/...`).
    Every process must enter: rank 0 sends the run's id to the others (the Trainer has joined them by now)."""
    if world.size == 1:
        yield
        return
    import mlflow
    import torch.distributed
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    shared = [run.info.run_id if world.main else None]
    torch.distributed.broadcast_object_list(shared, src=0)
    node = int(environ.get("GROUP_RANK", "0"))  # torchrun's number of this machine
    if world.local_rank != 0 or node == 0:
        yield
        return
    mlflow.set_tracking_uri(tracking_uri(environ, store_root(environ, Path.cwd())))
    monitor = SystemMetricsMonitor(
        shared[0], sampling_interval=tracking.system_metrics_seconds, resume_logging=True, node_id=f"node{node}"
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or one it arose from, says a disk is full: Python's `OSError` ENOSPC, or the message of the
    Rust writers of tokenizers and safetensors (`Exception: No space left on device (os error 28)`)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(words in str(error) for words in ("No space left on device", "os error 28", "StorageFull")):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def full_disk_named(*folders: Path) -> Iterator[None]:
    """An error of a full disk while training or saving becomes one that names the folders written to and the space
    left on their disks (the libraries' own messages name neither)."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        free = ", ".join(f"{folder}: {shutil.disk_usage(nearest(folder)).free:,} bytes free" for folder in folders)
        raise OSError(
            errno.ENOSPC,
            f"a disk is full: the training could not write its checkpoint or adapter ({free}). Free some space "
            "(or move models/ to a larger disk), then dvc repro: it resumes from the last complete checkpoint",
        ) from error


def nearest(path: Path) -> Path:
    """`path`, or its closest folder that exists."""
    return next(folder for folder in (path, *path.parents) if folder.exists())


@contextlib.contextmanager
def removed_unless_resumable(folder: Path) -> Iterator[None]:
    """A training that fails removes its checkpoint folder unless it holds a complete checkpoint to resume from (a
    diverged run keeps the ones before it diverged). A killed process removes nothing: the folder tells the next
    attempt which MLflow run was left RUNNING (`training_run` marks it KILLED)."""
    try:
        yield
    except BaseException:
        if checkpoints.latest(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def sort_target_modules(adapter: Path) -> None:
    """Sort `target_modules` in the adapter's `adapter_config.json`: peft writes them from a set, in an order that
    Python's hash seed changes from run to run, so that the same training gave another folder hash (and evaluate
    ran again on bitwise-equal weights)."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def record_adapter(run: Any, adapter: Path, registered_model: str | None) -> None:
    """The adapter as the run's artifacts, tagged with its SHA-256 (evaluate finds the run by it), and registered
    as a new version of `registered_model` unless that is null."""
    import mlflow

    mlflow.log_artifacts(str(adapter), artifact_path="adapter")
    mlflow.set_tag("adapter_sha256", adapter_digest(adapter))
    if registered_model:
        version = register_adapter(registered_model, run.info.run_id, run.info.artifact_uri)
        log.info("adapter registered as %s version %s", registered_model, version)


def main(
    params_path: Path, data: Path, adapter: Path, metrics: Path, plot: Path, eval_plot: Path, checkpoint_root: Path
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    from unsloth import FastLanguageModel

    model_config = params.load(ModelConfig, params_path, "model")
    lora = params.load(LoraConfig, params_path, "lora")
    train_config = params.load(TrainConfig, params_path, "train")
    tracking = params.load(TrackingConfig, params_path, "tracking")
    chat_config = params.load(ChatConfig, params_path, "chat")
    settings = {
        **params.flatten("model", model_config),
        **params.flatten("chat", chat_config),
        **params.flatten("lora", lora),
        **params.flatten("train", train_config),
    }
    # the number of processes is neither in the checkpoint folder's hash nor an MLflow parameter: a killed training
    # resumes, and continues its run, on another number of GPUs (the run is tagged with its `world_size`)
    del settings["train.devices"]
    log.info("config: %s", settings)
    check_names(model_config, lora, train_config)
    world = World.from_environ(dict(os.environ))
    train_config = shared_out(train_config, world)
    if world.size > 1:
        log.info(
            "rank %d of %d: %d per device x %d accumulation steps x %d processes",
            world.rank,
            world.size,
            train_config.per_device_train_batch_size,
            train_config.gradient_accumulation_steps,
            world.size,
        )

    # --- data: token ids and labels from the tokenize stage
    train_set, held_out = read_tokenized(data, train_config.eval_rows)
    log.info("training conversations: %d, held-out for the eval loss curve: %d", len(train_set), len(held_out))

    # --- resume: this configuration's checkpoint folder; a complete checkpoint there means a killed run to resume
    files = {"training": data / "train.arrow", "evaluation": data / "eval.arrow"}
    digests = {context: file_hash(path) for context, path in files.items()}  # DVC's hashes of the files
    folder = checkpoint_root / checkpoints.fingerprint(settings, digests)
    resume = checkpoints.latest(folder)
    if resume is not None:
        log.info("resuming from %s", resume)

    run_context = training_run(tracking, folder, resume, settings, files, digests, dict(os.environ))
    tracked = run_context if world.main else contextlib.nullcontext()  # rank 0 alone tracks and writes
    resumable = removed_unless_resumable(folder) if world.main else contextlib.nullcontext()
    with resumable, tracked as run, full_disk_named(folder, adapter):
        # --- model: 4-bit (or, fitted, 16-bit) base + LoRA adapter; `auto` settings decided for this GPU
        model_config, lora, train_config = fitted(model_config, lora, train_config)
        chosen = fit_tags(model_config, lora, train_config) | {"world_size": world.size}
        log.info("fitted to this machine: %s", chosen)
        if world.main:
            mlflow.set_tags(chosen)  # tags, not params: a resumed run may land on another GPU or number of them
        model, tokenizer = load_base(model_config, world.gpu)
        chat = Chat(tokenizer, chat_config)  # a `chat.template` is saved with the adapter's tokenizer
        chat.check(padding=True)
        check_encoding(chat, data)
        model = FastLanguageModel.get_peft_model(model, **asdict(lora))

        # --- train
        trainer = make_trainer(model, tokenizer, train_set, model_config, train_config, folder, eval_set=held_out)
        layout = batching_tags(trainer.args, model_config)
        log.info("batches: %s", layout)
        if world.main:
            mlflow.set_tags(layout)
        with machine_metrics(run, world, tracking, dict(os.environ)):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if not world.main:
            return

        # --- save and report: adapter + tokenizer + base precision, metrics, loss curves, MLflow artifacts
        model.save_pretrained(adapter)
        sort_target_modules(adapter)
        tokenizer.save_pretrained(adapter)
        record_precision(adapter, model_config)
        losses = loss_rows(trainer.state.log_history)  # the whole run's, a resumed one's included
        write_csv(plot, losses, LOSS_COLUMNS)
        write_csv(eval_plot, loss_rows(trainer.state.log_history, EVAL_LOSS_COLUMNS), EVAL_LOSS_COLUMNS)
        trainable, total = model.get_nb_trainable_parameters()
        report(
            {
                "train_loss": logged_mean(losses, "loss"),
                "tokens_per_second": logged_mean(losses, "tokens_per_second"),  # non-padding tokens
                "padding_share": logged_mean(losses, "padding_share"),
                "train_runtime": result.metrics["train_runtime"],
                "train_samples_per_second": result.metrics["train_samples_per_second"],
                "global_step": result.global_step,
                "train_conversations": len(train_set),
                "trainable_parameters": trainable,
                "total_parameters": total,
            },
            metrics,
            prefix="train",
        )
        record_adapter(run, adapter, tracking.registered_model)
        log.info(
            "run %s: adapter -> %s, metrics -> %s, loss curves -> %s, %s",
            run.info.run_id,
            adapter,
            metrics,
            plot,
            eval_plot,
        )
    shutil.rmtree(folder)  # trained: its checkpoints served their purpose


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="folder of the tokenize stage's Arrow files")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True, help="per-step training loss, CSV")
    parser.add_argument("--eval-plot", type=Path, required=True, help="held-out loss during training, CSV")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder of resumable checkpoints")
    args = parser.parse_args()
    # `train.devices` above 1, or other machines to meet: start again as that many processes under torchrun
    if not launched(dict(os.environ)):
        count = processes(params.load(TrainConfig, args.params, "train").devices, visible_gpus())
        if count > 1 or several_nodes(dict(os.environ)):
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            log.info("train.devices: %d processes on this machine, started by torch.distributed.run", count)
            restart_under_launcher(count, "stages.train", sys.argv[1:])
    main(args.params, args.data, args.adapter, args.metrics, args.plot, args.eval_plot, args.checkpoints)
