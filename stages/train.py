"""train: QLoRA fine-tuning of the base model on the standardized conversations with TRL's SFTTrainer.

    python -m stages.train --data data/standardized --adapter models/adapter \
        --metrics metrics/train.json --plot metrics/train_loss.csv --eval-plot metrics/eval_loss.csv

The base model comes from unsloth's `FastLanguageModel.from_pretrained`, the LoRA adapter from its
`get_peft_model` with every `lora.*` setting; conversations are rendered with the tokenizer's own chat
template. The run is recorded in MLflow: parameters, the trainer's per-step metrics, and the adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages import params
from stages.model import ModelConfig, load_base, mixed_precision
from stages.params import require
from stages.tracking import (
    TrackingConfig,
    adapter_digest,
    git_commit,
    report,
    run_name,
    store_root,
    tracking_uri,
    use_experiment,
    write_csv,
)

log = logging.getLogger("train")

LOSS_COLUMNS = ("step", "loss", "learning_rate", "grad_norm")
EVAL_LOSS_COLUMNS = ("step", "eval_loss")


@dataclass(frozen=True)
class LoraConfig:
    r: int  # adapter rank
    target_modules: list[str] = field(default_factory=list)  # projections that get an adapter
    lora_alpha: int = 16  # scaling: the update is multiplied by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input
    bias: str = "none"  # which biases train: none, all or lora_only
    use_gradient_checkpointing: str | bool = "unsloth"  # "unsloth", true or false
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
            self.use_gradient_checkpointing in ("unsloth", True, False),
            'lora.use_gradient_checkpointing must be "unsloth", true or false, '
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
    train_on_responses_only: bool = True  # loss on the assistant's tokens only (unsloth's train_on_responses_only)
    instruction_part: str = "<｜User｜>"  # where the chat template starts a user turn
    response_part: str = "<｜Assistant｜>"  # where it starts an answer: the tokens after it, to the next user turn,
    # are trained on (the end-of-sentence token included); system text and questions are masked

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
        for key in ("instruction_part", "response_part"):
            require(bool(getattr(self, key)), f"train.{key} must not be empty")


# `train.*` keys that this stage reads itself; the others are SFTConfig's
STAGE_KEYS = ("eval_rows", "train_on_responses_only", "instruction_part", "response_part")


def loss_rows(log_history: list[dict[str, float]], columns: tuple[str, ...] = LOSS_COLUMNS) -> list[dict[str, float]]:
    """The records of a Trainer's `log_history` that hold `columns[1]`, for the loss plots.

    `[{"loss": 2.0, "step": 1, "learning_rate": 1e-4, "grad_norm": 0.5}, {"train_runtime": 3.0, "step": 1}]`
    -> `[{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5}]`
    """
    return [{key: entry.get(key) for key in columns} for entry in log_history if columns[1] in entry]


def training_arguments(config: TrainConfig) -> dict[str, Any]:
    """SFTConfig's arguments from `train.*`: the settings pass straight through; evaluation runs if asked."""
    arguments = {key: value for key, value in asdict(config).items() if key not in STAGE_KEYS}
    if config.eval_steps is None:
        return arguments | {"eval_strategy": "no"}
    return arguments | {"eval_strategy": "steps", "per_device_eval_batch_size": config.per_device_train_batch_size}


def make_trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    model_config: ModelConfig,
    config: TrainConfig,
    output_dir: Path,
    eval_dataset: Any = None,
) -> Any:
    """TRL's SFTTrainer over role/content `messages`, with the `train.*` settings passed straight through.

    Precision follows the hardware; per-step metrics go to the active MLflow run; checkpoints are not kept.
    """
    from trl import SFTConfig, SFTTrainer

    if config.eval_steps is not None and eval_dataset is None:
        raise ValueError("train.eval_steps is set but no held-out conversations were given")
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        eval_dataset=eval_dataset if config.eval_steps is not None else None,
        args=SFTConfig(
            output_dir=str(output_dir),
            max_length=model_config.max_seq_length,
            save_strategy="no",
            report_to=["mlflow"],
            **mixed_precision(),
            **training_arguments(config),
        ),
    )
    if not config.train_on_responses_only:
        return trainer
    from unsloth.chat_templates import train_on_responses_only

    trainer = train_on_responses_only(
        trainer, instruction_part=config.instruction_part, response_part=config.response_part
    )
    trainer.train_dataset = drop_fully_masked(trainer.train_dataset, "training")
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = drop_fully_masked(trainer.eval_dataset, "held-out")
    return trainer


def drop_fully_masked(dataset: Any, split: str) -> Any:
    """Drop examples whose every label is masked (a question cut at max_seq_length before its answer, say).

    They teach nothing, and a batch of them has no token to average the loss over. Raises if none is left.
    """
    kept = dataset.filter(lambda labels: any(label != -100 for label in labels), input_columns="labels")
    if len(kept) == 0:
        raise ValueError(
            f"every {split} example is fully masked: no answer token within model.max_seq_length, or "
            "train.response_part does not occur in the chat template's rendering"
        )
    if len(kept) < len(dataset):
        log.warning(
            "%s: %d of %d examples have no answer token to train on: dropped",
            split,
            len(dataset) - len(kept),
            len(dataset),
        )
    return kept


def main(params_path: Path, data: Path, adapter: Path, metrics: Path, plot: Path, eval_plot: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    from datasets import Dataset
    from unsloth import FastLanguageModel

    model_config = params.load(ModelConfig, params_path, "model")
    lora = params.load(LoraConfig, params_path, "lora")
    train_config = params.load(TrainConfig, params_path, "train")
    tracking = params.load(TrackingConfig, params_path, "tracking")
    resolved = {
        **params.flatten("model", model_config),
        **params.flatten("lora", lora),
        **params.flatten("train", train_config),
    }
    log.info("config: %s", resolved)

    # --- data: role/content conversations, which SFTTrainer renders with the tokenizer's chat template
    dataset = Dataset.from_parquet(str(data / "train.parquet")).rename_column("conversations", "messages")
    held_out = Dataset.from_parquet(str(data / "eval.parquet")).rename_column("conversations", "messages")
    held_out = held_out.select(range(min(train_config.eval_rows, len(held_out))))
    log.info("training conversations: %d, held-out for the eval loss curve: %d", len(dataset), len(held_out))

    # --- tracking: one MLflow run per training, at the repo root's store
    root = store_root(os.environ, Path.cwd())
    use_experiment(tracking_uri(os.environ, root), tracking.experiment_name, root / "mlartifacts")
    commit = git_commit(Path.cwd())
    with mlflow.start_run(run_name=run_name(os.environ, commit)) as run:
        mlflow.set_tags({"git_commit": commit, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "stage": "train"})
        mlflow.log_params(resolved)

        # --- model: 4-bit base + LoRA adapter
        model, tokenizer = load_base(model_config)
        model = FastLanguageModel.get_peft_model(model, **asdict(lora))

        with tempfile.TemporaryDirectory(prefix="train-") as output_dir:
            trainer = make_trainer(
                model, tokenizer, dataset, model_config, train_config, Path(output_dir), eval_dataset=held_out
            )
            result = trainer.train()

        # --- outputs: adapter + tokenizer, metrics, loss curve, MLflow artifacts
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        write_csv(plot, loss_rows(trainer.state.log_history), LOSS_COLUMNS)
        write_csv(eval_plot, loss_rows(trainer.state.log_history, EVAL_LOSS_COLUMNS), EVAL_LOSS_COLUMNS)
        trainable, total = model.get_nb_trainable_parameters()
        report(
            {
                "train_loss": result.training_loss,
                "train_runtime": result.metrics["train_runtime"],
                "train_samples_per_second": result.metrics["train_samples_per_second"],
                "global_step": result.global_step,
                "train_conversations": len(dataset),
                "train_conversations_fully_masked": len(dataset) - len(trainer.train_dataset),
                "trainable_parameters": trainable,
                "total_parameters": total,
            },
            metrics,
            prefix="train",
        )
        mlflow.log_artifacts(str(adapter), artifact_path="adapter")
        mlflow.set_tag("adapter_sha256", adapter_digest(adapter))
        log.info(
            "run %s: adapter -> %s, metrics -> %s, loss curves -> %s, %s",
            run.info.run_id,
            adapter,
            metrics,
            plot,
            eval_plot,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True, help="per-step training loss, CSV")
    parser.add_argument("--eval-plot", type=Path, required=True, help="held-out loss during training, CSV")
    args = parser.parse_args()
    main(args.params, args.data, args.adapter, args.metrics, args.plot, args.eval_plot)
