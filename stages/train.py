"""train: QLoRA fine-tuning of the base model on the standardized conversations with TRL's SFTTrainer.

    python -m stages.train --data data/standardized --adapter models/adapter --checkpoints models/checkpoints \
        --metrics metrics/train.json --plot metrics/train_loss.csv --eval-plot metrics/eval_loss.csv

The base model comes from unsloth's `FastLanguageModel.from_pretrained`, the LoRA adapter from its
`get_peft_model` with every `lora.*` setting; conversations are encoded by `stages.chat` (the chat template,
the think block, answer-only labels), as evaluate and generate encode them. The run is recorded in MLflow:
parameters, the trainer's per-step metrics, and the adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

from stages import checkpoints, fit, params
from stages.chat import IGNORE_INDEX, Chat, ChatConfig
from stages.model import ModelConfig, gpu_memory, load_base, mixed_precision, resolved, shape
from stages.params import require
from stages.tracking import (
    TrackingConfig,
    adapter_digest,
    file_hash,
    git_commit,
    lock_hashes,
    log_data_inputs,
    register_adapter,
    report,
    run_name,
    store_root,
    tracking_uri,
    use_experiment,
    write_csv,
)

log = logging.getLogger("train")

LOSS_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "padding_share")
EVAL_LOSS_COLUMNS = ("step", "eval_loss")
DATA_TAGS = ("data/raw", "data/sharegpt", "data/standardized")  # dvc.lock hashes tagged on the run


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
    train_on_responses_only: bool = True  # loss on the answers' own tokens only (see stages.chat); false = all
    packing: bool = False  # TRL packing: conversations concatenated into max_seq_length rows (bfd)
    padding_free: bool | None = None  # batches without pad tokens; null = unsloth's choice (on where supported)
    save_steps: int | None = None  # steps between checkpoints that a killed run resumes from; null = none
    save_total_limit: int = 2  # checkpoints kept; at least 2, so one whole survives a kill during a save
    micro_batch_size: str | None = None  # auto = the largest split of the effective batch the GPU holds (stages.fit)

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


# `train.*` keys that this stage reads itself; the others are SFTConfig's
STAGE_KEYS = ("eval_rows", "train_on_responses_only", "micro_batch_size")


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
    """SFTConfig's arguments from `train.*`: the settings pass straight through; evaluation and saves if asked."""
    arguments = {key: value for key, value in asdict(config).items() if key not in STAGE_KEYS}
    arguments["save_strategy"] = "no" if config.save_steps is None else "steps"
    if config.eval_steps is None:
        return arguments | {"eval_strategy": "no"}
    return arguments | {"eval_strategy": "steps", "per_device_eval_batch_size": config.per_device_train_batch_size}


def encode(chat: Chat, dataset: Any, max_length: int, answers_only: bool, split: str) -> tuple[Any, int]:
    """Token ids and labels of each conversation (`chat.encode`), cut to `max_length` tokens.

    With `answers_only`, only the answers' own tokens carry labels; else every token does. Conversations left
    with no labelled token (a question that fills `max_length`, say) teach nothing and are dropped: returns the
    encoded set and how many were dropped. Raises if none is left.
    """

    def batch(rows: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        encoded = chat.encode_many(rows["messages"], max_length)
        return {
            "input_ids": [ids for ids, _ in encoded],
            "labels": [labels if answers_only else ids for ids, labels in encoded],
        }

    encoded = dataset.map(batch, batched=True, remove_columns=dataset.column_names, desc=f"Encoding {split}")
    kept = encoded.filter(lambda labels: any(label != IGNORE_INDEX for label in labels), input_columns="labels")
    if len(kept) == 0:
        raise ValueError(
            f"every {split} conversation is fully masked: no answer token within model.max_seq_length "
            f"({max_length} tokens)"
        )
    if len(kept) < len(encoded):
        log.warning(
            "%s: %d of %d conversations have no answer token within %d tokens: dropped",
            split,
            len(encoded) - len(kept),
            len(encoded),
            max_length,
        )
    return kept, len(encoded) - len(kept)


def project_trainer(trainer_class: type) -> type:
    """`trainer_class`, adding to each training log the tokens/s and the share of padding since the last log,
    and resuming a checkpoint with the adapter in the dtype that unsloth's `get_peft_model` gave it.

    Tokens are counted where the loss is computed in training mode, so evaluation batches and time are left out.
    A token is a non-padding position (all of a padding-free batch); padding is the rest of the batch.
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

        _tokens: Any = 0  # a tensor on the model's device once counted: read at log time, no sync per batch
        _positions = 0
        _since: float | None = None

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if model.training:
                positions = inputs["input_ids"].numel()
                mask = inputs.get("attention_mask")
                self._tokens = self._tokens + (mask.sum() if mask is not None else positions)
                self._positions += positions
                self._since = self._since or time.perf_counter()
            return super().compute_loss(model, inputs, *args, **kwargs)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._positions and self._since is not None:
                tokens = float(self._tokens)
                elapsed = time.perf_counter() - self._since
                logs = logs | {
                    "tokens_per_second": tokens / elapsed,
                    "padding_share": 1.0 - tokens / self._positions,
                }
                self._tokens = self._positions = 0
                self._since = time.perf_counter()
            super().log(logs, *args, **kwargs)

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            result = super().evaluate(*args, **kwargs)
            self._since = self._since and time.perf_counter()  # evaluation time is not training time
            return result

    return ProjectTrainer


def make_trainer(
    model: Any,
    chat: Chat,
    dataset: Any,
    model_config: ModelConfig,
    config: TrainConfig,
    output_dir: Path,
    eval_dataset: Any = None,
) -> tuple[Any, int]:
    """TRL's SFTTrainer over role/content `messages`, encoded by `chat`; and how many were dropped unlearnable.

    The `train.*` settings pass straight through; precision follows the hardware; per-step metrics go to the
    active MLflow run; checkpoints go to `output_dir`, each marked complete once written (`stages.checkpoints`).
    """
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class MarkComplete(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoints.mark_complete(output_dir, state.global_step)

    if config.eval_steps is not None and eval_dataset is None:
        raise ValueError("train.eval_steps is set but no held-out conversations were given")
    chat.check(padding=True)
    length, answers_only = model_config.max_seq_length, config.train_on_responses_only
    train_set, dropped = encode(chat, dataset, length, answers_only, "training")
    eval_set = None
    if config.eval_steps is not None:
        eval_set, _ = encode(chat, eval_dataset, length, answers_only, "held-out")
    trainer = project_trainer(SFTTrainer)(
        model=model,
        processing_class=chat.tokenizer,
        train_dataset=train_set,
        eval_dataset=eval_set,
        args=SFTConfig(
            output_dir=str(output_dir),
            max_length=length,
            report_to=["mlflow"],
            **mixed_precision(),
            **training_arguments(config),
        ),
        callbacks=[MarkComplete()],
    )
    return trainer, dropped


def fitted(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> tuple[Any, Any, Any]:
    """The three configs with their `auto` settings decided for this machine (`stages.fit`), the others as written."""
    model_config = resolved(model_config)
    if lora.use_gradient_checkpointing != "auto" and config.micro_batch_size != "auto":
        return model_config, lora, config
    chosen = fit.plan(
        shape(model_config),
        gpu_memory(),
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


def run_status(run_id: str) -> str | None:
    """The MLflow run's status (RUNNING, FINISHED, FAILED, KILLED), or None if the store does not hold it."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None


def fit_tags(model_config: ModelConfig, lora: LoraConfig, config: TrainConfig) -> dict[str, Any]:
    """The settings that `fitted` decides, as the MLflow run is tagged with them."""
    return {
        "fit.load_in_4bit": model_config.load_in_4bit,
        "fit.use_gradient_checkpointing": lora.use_gradient_checkpointing,
        "fit.per_device_train_batch_size": config.per_device_train_batch_size,
        "fit.gradient_accumulation_steps": config.gradient_accumulation_steps,
    }


def main(
    params_path: Path, data: Path, adapter: Path, metrics: Path, plot: Path, eval_plot: Path, checkpoint_root: Path
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    from datasets import Dataset
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
    log.info("config: %s", settings)

    # --- data: role/content conversations, encoded by stages.chat when the trainer is made
    dataset = Dataset.from_parquet(str(data / "train.parquet")).rename_column("conversations", "messages")
    held_out = Dataset.from_parquet(str(data / "eval.parquet")).rename_column("conversations", "messages")
    held_out = held_out.select(range(min(train_config.eval_rows, len(held_out))))
    log.info("training conversations: %d, held-out for the eval loss curve: %d", len(dataset), len(held_out))

    # --- checkpoints: this configuration's folder; a complete checkpoint there means a killed run to resume
    files = {"training": data / "train.parquet", "evaluation": data / "eval.parquet"}
    digests = {context: file_hash(path) for context, path in files.items()}  # DVC's hashes of the files
    folder = checkpoint_root / checkpoints.fingerprint(settings, digests)
    resume = checkpoints.latest(folder)
    if resume is not None:
        log.info("resuming from %s", resume)

    # --- tracking: one MLflow run per training (a resumed training continues its run), at the repo root's store
    root = store_root(os.environ, Path.cwd())
    use_experiment(tracking_uri(os.environ, root), tracking.experiment_name, root / "mlartifacts")
    commit = git_commit(Path.cwd())
    earlier = checkpoints.run_id(folder)
    status = run_status(earlier) if earlier is not None else None
    if resume is None and status == "RUNNING":  # killed (a failed run was marked FAILED as it failed)
        mlflow.MlflowClient().set_terminated(earlier, "KILLED")
    if resume is None or status is None:  # nothing of it is reused, or its store was deleted: a new run
        earlier = None
    name = None if earlier else run_name(os.environ, commit)
    mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_seconds)
    with mlflow.start_run(run_id=earlier, run_name=name, log_system_metrics=True) as run:  # FAILED if it raises
        checkpoints.remember_run(folder, run.info.run_id)
        locked = {f"dvc_lock.{path}": md5 for path, md5 in lock_hashes(Path("dvc.lock")).items() if path in DATA_TAGS}
        tags = {"git_commit": commit, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "stage": "train"}
        mlflow.set_tags(tags | locked | ({"resumed_from": resume.name} if resume else {}))
        mlflow.log_params(settings)
        if resume is None:
            log_data_inputs(files, digests)

        # --- model: 4-bit (or, fitted, 16-bit) base + LoRA adapter; `auto` settings decided for this GPU
        model_config, lora, train_config = fitted(model_config, lora, train_config)
        chosen = fit_tags(model_config, lora, train_config)
        log.info("fitted to this machine: %s", chosen)
        mlflow.set_tags(chosen)  # tags, not params: a resumed run may land on another GPU
        model, tokenizer = load_base(model_config)
        model = FastLanguageModel.get_peft_model(model, **asdict(lora))
        trainer, fully_masked = make_trainer(
            model, Chat(tokenizer, chat_config), dataset, model_config, train_config, folder, eval_dataset=held_out
        )
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        # --- outputs: adapter + tokenizer, metrics, loss curve, MLflow artifacts
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
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
                "train_conversations": len(dataset),
                "train_conversations_fully_masked": fully_masked,
                "trainable_parameters": trainable,
                "total_parameters": total,
            },
            metrics,
            prefix="train",
        )
        mlflow.log_artifacts(str(adapter), artifact_path="adapter")
        mlflow.set_tag("adapter_sha256", adapter_digest(adapter))
        if tracking.registered_model:
            version = register_adapter(tracking.registered_model, run.info.run_id, run.info.artifact_uri)
            log.info("adapter registered as %s version %s", tracking.registered_model, version)
        log.info(
            "run %s: adapter -> %s, metrics -> %s, loss curves -> %s, %s",
            run.info.run_id,
            adapter,
            metrics,
            plot,
            eval_plot,
        )
    shutil.rmtree(folder)  # trained: the checkpoints served their purpose, a crash


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True, help="per-step training loss, CSV")
    parser.add_argument("--eval-plot", type=Path, required=True, help="held-out loss during training, CSV")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder of resumable checkpoints")
    args = parser.parse_args()
    main(args.params, args.data, args.adapter, args.metrics, args.plot, args.eval_plot, args.checkpoints)
