"""train: QLoRA fine-tuning of the base model on the tokenized conversations with TRL's SFTTrainer.

    python -m stages.train --data data/tokenized --adapter models/adapter --checkpoints models/checkpoints \
        --metrics metrics/train.json --plot metrics/train_loss.csv --eval-plot metrics/eval_loss.csv

A recipe, top to bottom: the settings; the token ids and labels the tokenize stage wrote (nothing is encoded
here); the checkpoint to resume from, if a run of the same settings and data was killed; the MLflow run; the base
model from unsloth's `FastLanguageModel.from_pretrained` and the LoRA adapter from its `get_peft_model` with every
`lora.*` setting; TRL's SFTTrainer (`finetune.training.trainer`); then the adapter, the metrics and the loss curves.
With `train.devices` above 1 the stage starts again as that many processes under torchrun; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from finetune.config import cli
from finetune.config.params import flatten, load
from finetune.data.files import file_hash, write_csv
from finetune.model import compiled_blocks, fit
from finetune.model.load import ModelConfig, load_base
from finetune.model.patches import apply_speed_patches
from finetune.tokens.chat import Chat, ChatConfig
from finetune.tracking.records import report
from finetune.tracking.store import TrackingConfig
from finetune.tracking.training_run import machine_metrics, record_adapter, training_run
from finetune.training import leases
from finetune.training.checkpoints import checkpoint_step, fingerprint, keep_precision, latest
from finetune.training.config import LoraConfig, TrainConfig, check_names
from finetune.training.data import (
    EVAL_LOSS_COLUMNS,
    LOSS_COLUMNS,
    attempt_speed,
    check_encoding,
    logged_mean,
    loss_rows,
    read_tokenized,
)
from finetune.training.distributed import World, splits, start_processes
from finetune.training.failures import full_disk_named, removed_unless_resumable

log = logging.getLogger("train")


def main(
    params_path: Path, data: Path, adapter: Path, checkpoints: Path, metrics: Path, plot: Path, eval_plot: Path
) -> None:
    import unsloth  # noqa: F401, I001  # isort: skip  # first: it patches transformers, trl and peft
    import mlflow
    from unsloth import FastLanguageModel

    from finetune.training.adapter import save_adapter
    from finetune.training.batching import batching_tags
    from finetune.training.trainer import build_trainer  # here, not above: torchrun's restart needs none of these

    # --- settings: the sections this stage declares in dvc.yaml, logged as resolved
    model_config = load(ModelConfig, params_path, "model")
    lora, train_config = load(LoraConfig, params_path, "lora"), load(TrainConfig, params_path, "train")
    tracking, chat_config = load(TrackingConfig, params_path, "tracking"), load(ChatConfig, params_path, "chat")
    settings = {
        **flatten("model", model_config),
        **flatten("chat", chat_config),
        **flatten("lora", lora),
        **flatten("train", train_config),
    }
    # the number of processes is neither in the checkpoint folder's hash nor an MLflow parameter: a killed training
    # resumes, and continues its run, on another number of GPUs (the run is tagged with its `world_size`)
    del settings["train.devices"]
    log.info("config: %s", settings)
    check_names(model_config, lora, train_config)
    world = World.from_environ(dict(os.environ))
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "all") if leases.visible_gpus() else "none"  # the lease, on a GPU
    train_config = fit.split_batch_over_processes(train_config, world)
    if world.size > 1:
        share = (train_config.per_device_train_batch_size, train_config.gradient_accumulation_steps, world.size)
        log.info("rank %d of %d: %d per device x %d accumulation steps x %d processes", world.rank, world.size, *share)

    # --- data: token ids and labels from the tokenize stage
    train_set, held_out = read_tokenized(data, train_config.eval_rows)
    log.info("training conversations: %d, held-out for the eval loss curve: %d", len(train_set), len(held_out))

    # --- resume: this configuration's checkpoint folder; a complete checkpoint there means a killed run to resume
    files = {"training": data / "train.arrow", "evaluation": data / "eval.arrow"}
    digests = {context: file_hash(path) for context, path in files.items()}  # DVC's hashes of the files
    folder = checkpoints / fingerprint(settings, digests)
    resume = latest(folder)
    if resume is not None:
        log.info("resuming from %s", resume)

    # rank 0 alone tracks and writes; a failure leaves a resumable checkpoint or nothing, a full disk is named
    tracked = training_run(tracking, folder, resume, settings, files, digests, os.environ)
    resumable = removed_unless_resumable(folder)
    with (
        resumable if world.main else contextlib.nullcontext(),
        tracked if world.main else contextlib.nullcontext() as run,
        full_disk_named(folder, adapter),
    ):
        # --- model: 4-bit (or, fitted, 16-bit) base + LoRA adapter; `auto` settings decided for this GPU
        model_config, lora, train_config = fit.fit_to_machine(model_config, lora, train_config)
        chosen = fit.fit_tags(model_config, lora, train_config) | {"world_size": world.size, "fit.gpus": gpus}
        log.info("fitted to this machine: %s", chosen)
        if world.main:  # tags, not params: a resumed run may land on another GPU or number of them
            mlflow.set_tags(chosen)
            keep_precision(folder, model_config, resume)  # but not on another base's precision
        apply_speed_patches()
        model, tokenizer = load_base(model_config, world.gpu)
        compiled = compiled_blocks.compile_padding_free_blocks(model, model_config.load_in_4bit, lora)  # where faster
        chat = Chat(tokenizer, chat_config)  # a `chat.template` is saved with the adapter's tokenizer
        chat.check(padding=True)
        check_encoding(chat, data)
        model = FastLanguageModel.get_peft_model(model, **asdict(lora))
        if compiled:  # LoRA through peft's layers, which the compiled blocks see through, where measured faster
            compiled_blocks.unfuse_lora(model)

        # --- train
        trainer = build_trainer(model, tokenizer, train_set, model_config, train_config, folder, eval_set=held_out)
        layout = batching_tags(trainer.args, model_config)
        log.info("batches: %s", layout)
        if world.main:
            mlflow.set_tags(layout)
        with machine_metrics(run, world, tracking, os.environ):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        for line in compiled_blocks.report(model) if compiled else []:
            log.info(line)
        if train_config.micro_batch_tokens is not None:
            log.info(
                "forward passes: %d for %d micro-batches, at most %d positions each (train.micro_batch_tokens)",
                *(trainer.passes_run, trainer.micro_batches_run, train_config.micro_batch_tokens),
            )
        if not world.main:
            return

        # --- save and report: adapter + tokenizer + base precision, metrics, loss curves, MLflow artifacts
        save_adapter(model, tokenizer, adapter, model_config)
        losses = loss_rows(trainer.state.log_history)  # the whole run's, a resumed one's included
        write_csv(plot, losses, LOSS_COLUMNS)
        eval_losses = loss_rows(trainer.state.log_history, EVAL_LOSS_COLUMNS)
        write_csv(eval_plot, eval_losses, EVAL_LOSS_COLUMNS)
        trainable, total = model.get_nb_trainable_parameters()
        results = {
            "train_loss": logged_mean(losses, "loss"),
            "tokens_per_second": logged_mean(losses, "tokens_per_second"),  # non-padding tokens
            "padding_share": logged_mean(losses, "padding_share"),
            # of this attempt: a resumed training's since its checkpoint
            **attempt_speed(result.metrics, result.global_step - checkpoint_step(resume), trainer.state.max_steps),
            "global_step": result.global_step,
            "train_conversations": len(train_set),
            "trainable_parameters": trainable,
            "total_parameters": total,
        }
        report(results, metrics, prefix="train")
        record_adapter(run, adapter, tracking.registered_model)
        log.info("run %s: adapter -> %s, loss curves -> %s, %s", run.info.run_id, adapter, plot, eval_plot)
    shutil.rmtree(folder)  # trained: its checkpoints served their purpose


if __name__ == "__main__":
    paths = cli.arguments(
        __doc__,
        data="folder of the tokenize stage's Arrow files",
        adapter="folder the adapter is saved to",
        checkpoints="folder of resumable checkpoints",
        metrics="the stage's metrics, JSON",
        plot="per-step training loss, CSV",
        eval_plot="held-out loss during training, CSV",
    )
    # this training's GPUs, leased; more than one, or other machines to meet: started again as that many processes
    params = paths["params_path"]
    config = load(TrainConfig, params, "train")
    fits = splits(config.per_device_train_batch_size, config.gradient_accumulation_steps)
    start_processes("train", params, config.devices, fits, machines=True)
    main(**paths)
