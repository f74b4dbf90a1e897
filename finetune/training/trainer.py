"""TRL's SFTTrainer as the train stage runs it: over the tokenize stage's ids, with its token counts on the device
and, for `batch_rebalance`, each step's conversations split by tokens (`build_trainer` makes it).

Tokens are the non-padding positions of the training batches (all of a padding-free batch), summed over every
process; padding is the share of positions that are not tokens; evaluation batches and time are left out. They are
counted as the Trainer's `include_num_input_tokens_seen` counts them, but added up on the device and read once per
log (and before each checkpoint, which keeps the count), where the Trainer's own count reads them back after every
micro-batch: a host synchronisation that drained the GPU's queue each time (BENCHMARKS.md).
"""

from __future__ import annotations

import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler
from trl import SFTConfig, SFTTrainer

from finetune.config.params import require
from finetune.model.load import ModelConfig, mixed_precision
from finetune.training.batching import check_cut, cut_by_tokens, split_step_by_tokens, token_counts
from finetune.training.callbacks import MarkCheckpointsComplete, StopOnDivergence
from finetune.training.config import TrainConfig, check_pass_length, training_arguments
from finetune.training.distributed import World


class TokenSampler(BatchRebalanceSampler):
    """transformers' `batch_rebalance` sampler, each step's conversations split over processes and micro-batches by
    their tokens (`split_step_by_tokens`): padding-free batches cost their tokens, not their longest row."""

    def _assign(self, indices: list[int], lengths: list[int]) -> list[list[list[int]]]:
        return split_step_by_tokens(indices, lengths, self.dp_size, self.grad_accum)


class TokenCountingTrainer(SFTTrainer):
    """SFTTrainer that adds to each training log the tokens/s and the share of padding since the last log, and
    resumes a checkpoint with the adapter in the dtype that unsloth's `get_peft_model` gave it."""

    _pending: Any = 0  # this process's tokens since the last count: a device tensor for batches with padding
    _pending_positions = 0  # this process's positions since the last count, padding included (host-side numel)
    _tokens = 0  # every process's tokens since the last log
    _positions = 0  # every process's positions since the last log
    _since: float | None = None  # when this log interval's training time started
    micro_batch_tokens: int | None = None  # most positions a forward pass holds (`train.micro_batch_tokens`)
    micro_batches_run = 0  # micro-batches this process trained on, and the forward passes they took
    passes_run = 0

    def _load_from_checkpoint(self, checkpoint: str, model: Any = None) -> None:
        # peft loads a saved adapter in float32 (autocast_adapter_dtype); unsloth trains it in the model's 16-bit
        # dtype. Without the cast back, a resumed run would go on in other precision than it started.
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(checkpoint, model)
        for name, parameter in self.model.named_parameters():
            if name in dtypes and parameter.dtype != dtypes[name]:
                parameter.data = parameter.data.to(dtypes[name])

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """The Trainer's step over `inputs`, in as few passes of at most `micro_batch_tokens` positions as hold them
        (`cut_by_tokens`; one pass if unset). Each pass's loss is its summed loss over the whole micro-batch's
        `num_items_in_batch`, so the passes add up to the micro-batch's loss and gradients. Several processes run as
        many passes each, the most any of them needs (a pass's loss, TRL's token counts, DDP's buffers: each is a
        collective), and exchange the gradients once, after the last."""
        self._since = self._since or time.perf_counter()
        passes = cut_by_tokens(inputs, self.micro_batch_tokens) if self.micro_batch_tokens else [inputs]
        if self.micro_batch_tokens and self.accelerator.num_processes > 1:
            count = torch.tensor([len(passes)], device=self.args.device)
            most = int(self.accelerator.gather(count).max())
            if most > len(passes):
                passes = cut_by_tokens(inputs, self.micro_batch_tokens, most)
        self.micro_batches_run, self.passes_run = self.micro_batches_run + 1, self.passes_run + len(passes)
        if len(passes) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # each pass's mean would weigh alike (build_trainer checked the model)
            raise ValueError(
                "train.micro_batch_tokens cuts a micro-batch into passes, which needs the micro-batch's count of "
                "learnt tokens (num_items_in_batch); the Trainer gave none"
            )
        loss = 0
        for i, part in enumerate(passes):
            last = i == len(passes) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = loss + super().training_step(model, part, num_items_in_batch)
        return loss

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self._pending = self._pending + (mask.sum() if mask is not None else ids.numel())
        self._pending_positions += ids.numel()

    def _count_tokens(self) -> None:
        """Add the tokens and positions since the last count, summed over the processes, to the run's count
        (`state.num_input_tokens_seen`, kept in checkpoints) and to this log interval's. One read, on every process
        alike (it is a collective)."""
        device = self.args.device
        local = torch.stack([torch.as_tensor(n, device=device) for n in (self._pending, self._pending_positions)])
        tokens, positions = self.accelerator.reduce(local.to(torch.int64), reduction="sum").tolist()
        self.state.num_input_tokens_seen += tokens
        self._tokens, self._positions = self._tokens + tokens, self._positions + positions
        self._pending, self._pending_positions = 0, 0

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._count_tokens()  # the checkpoint's state holds the count a resumed run goes on from
        start = time.perf_counter()
        super()._save_checkpoint(*args, **kwargs)
        if self._since is not None:  # saving is not training time either (it follows the step's log)
            self._since += time.perf_counter() - start

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
        # `batch_rebalance`: transformers' sampler (the same conversations per step on every process, shuffled with
        # the run's seed, not its fixed 42), lengths from the Arrow offsets (it reads every row in Python, on every
        # process); padding-free batches cost their tokens, so they are split by tokens (`TokenSampler`)
        if self.args.train_sampling_strategy != "batch_rebalance":
            return super()._get_train_sampler(train_dataset)
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


def build_trainer(
    model: Any,
    tokenizer: Any,
    train_set: Any,
    model_config: ModelConfig,
    config: TrainConfig,
    output_dir: Path,
    eval_set: Any = None,
) -> TokenCountingTrainer:
    """The trainer over tokenized conversations (`input_ids`, `labels`), as the tokenize stage writes them.

    The `train.*` settings pass straight through; precision follows the hardware; per-step metrics go to the
    active MLflow run; checkpoints go to `output_dir`, each marked complete once written. `train.micro_batch_tokens`,
    decided by `finetune.model.fit`, cuts each training micro-batch into passes (`TokenCountingTrainer`).
    """
    if config.eval_steps is not None and eval_set is None:
        raise ValueError("train.eval_steps is set but no held-out conversations were given")
    for rows in (train_set, eval_set):
        if rows is not None:
            check_cut(rows, model_config.max_seq_length)
    require(
        config.micro_batch_tokens is None or isinstance(config.micro_batch_tokens, int),
        "train.micro_batch_tokens must be decided before training (finetune.model.fit.fit_to_machine), got "
        f"{config.micro_batch_tokens!r}",
    )
    check_pass_length(config.micro_batch_tokens, model_config.max_seq_length)
    trainer = TokenCountingTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=train_set,
        eval_dataset=eval_set if config.eval_steps is not None else None,
        args=SFTConfig(
            output_dir=str(output_dir),
            max_length=model_config.max_seq_length,
            report_to=["mlflow"],
            # `num_input_tokens_seen` in the logs and checkpoints: non-padding tokens, counted by the trainer
            include_num_input_tokens_seen="non_padding",
            logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (StopOnDivergence ends the training)
            # several processes: every LoRA weight gets a gradient, so DDP need not search the graph for unused ones
            ddp_find_unused_parameters=False if World.from_environ(dict(os.environ)).size > 1 else None,
            **mixed_precision(model_config.dtype),
            **training_arguments(config, model_config.max_seq_length),
        ),
        callbacks=[MarkCheckpointsComplete(output_dir), StopOnDivergence(config)],
    )
    if config.micro_batch_tokens is not None:  # passes add up to the micro-batch only for a loss summed over tokens
        require(
            trainer.model_accepts_loss_kwargs and not getattr(trainer, "aux_loss_enabled", False),
            "train.micro_batch_tokens cuts micro-batches into passes, which needs a loss summed over the learnt "
            f"tokens without an auxiliary loss; {type(model).__name__} takes no num_items_in_batch or adds one",
        )
        trainer.micro_batch_tokens = config.micro_batch_tokens
    return trainer
