"""train: unsloth 4-bit base + LoRA via TRL's SFTTrainer on tokenized conversations; the adapter learns, the base
stays frozen, and the labels the tokenize stage made are the ones the trainer learns from."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from datasets import Dataset
from examples import LORA, TINY_TRAINING
from transformers.trainer_pt_utils import BatchRebalanceSampler
from unsloth import FastLanguageModel

from finetune.model.load import ModelConfig, load_base
from finetune.tokens.chat import IGNORE_INDEX, Chat, ChatConfig
from finetune.tokens.encode import tokenized
from finetune.training.batching import batching_tags, cut_by_tokens, split_step_by_tokens
from finetune.training.config import LoraConfig, TrainConfig, check_names
from finetune.training.data import loss_rows
from finetune.training.failures import disk_full
from finetune.training.trainer import TokenSampler, build_trainer

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

TRAIN = TINY_TRAINING


def tiny_trainer(model_config: ModelConfig, conversations: list, config: TrainConfig, out: Path) -> tuple[Any, Dataset]:
    """The train stage's trainer of the tiny model with the seed's LoRA on `conversations`, tokenized as tokenize
    does: the trainer and the rows."""
    model, tokenizer = load_base(model_config)
    model = FastLanguageModel.get_peft_model(model, **LORA.__dict__)
    rows = tokenized(Chat(tokenizer, ChatConfig()), conversations, model_config.max_seq_length)
    return build_trainer(model, tokenizer, rows, model_config, config, out), rows


def toy_conversations(n: int) -> list[list[dict[str, str]]]:
    """A learnable rule: whatever the question, the answer is the same sentence."""
    return [
        [
            {"role": "user", "content": f"What is the current ratio of firm {i}?"},
            {"role": "assistant", "content": "The current ratio is current assets over current liabilities."},
        ]
        for i in range(n)
    ]


def test_loss_rows_keep_per_step_records_only() -> None:
    history = [
        {"loss": 2.0, "step": 1, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.1},
        {"train_runtime": 3.0, "train_loss": 2.0, "step": 1},
    ]
    assert loss_rows(history) == [
        {
            "step": 1,
            "loss": 2.0,
            "learning_rate": 1e-4,
            "grad_norm": 0.5,
            "tokens_per_second": None,
            "padding_share": None,
        }
    ]


def test_adapter_learns_and_base_stays_frozen(tiny_model_dir: Path, tmp_path: Path, mlflow_store: str) -> None:
    model_config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=256, load_in_4bit=True, dtype=None
    )
    model, tokenizer = load_base(model_config)
    model = FastLanguageModel.get_peft_model(model, **LORA.__dict__)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen_before = {name: b.detach().clone() for name, b in model.state_dict().items() if "lora_" not in name}

    data = tokenized(Chat(tokenizer, ChatConfig()), toy_conversations(32), model_config.max_seq_length)
    trainer = build_trainer(model, tokenizer, data, model_config, TRAIN, tmp_path / "out")
    trainer.train()

    losses = [row["loss"] for row in loss_rows(trainer.state.log_history)]
    assert len(losses) == TRAIN.max_steps and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    after = dict(model.named_parameters())
    trained = [name for name, p in after.items() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    assert all(not torch.equal(before[name], after[name]) for name in trained if "lora_B" in name)
    frozen_after = model.state_dict()
    assert all(torch.equal(frozen_before[name], frozen_after[name]) for name in frozen_before)


def test_lora_settings_reach_the_adapter(tiny_model_dir: Path) -> None:
    model_config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=128, load_in_4bit=True, dtype=None
    )
    model, _ = load_base(model_config)
    model = FastLanguageModel.get_peft_model(model, **replace(LORA, r=8, target_modules=["q_proj", "v_proj"]).__dict__)
    peft_config = model.peft_config["default"]
    assert peft_config.r == 8 and peft_config.lora_alpha == 16
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}


TWO_TURNS = [
    {"role": "system", "content": "You answer questions on corporate finance."},
    {"role": "user", "content": "What is working capital?"},
    {"role": "assistant", "content": "Current assets minus current liabilities."},
    {"role": "user", "content": "And the quick ratio?"},
    {"role": "assistant", "content": "Liquid assets over current liabilities."},
]


def test_the_trainer_learns_from_the_answers_and_their_end_token_only(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    trainer, _ = tiny_trainer(model_config, [TWO_TURNS] * 4, TRAIN, tmp_path / "out")
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))  # what the model is given: the collator's labels
    user, assistant, think = (tokenizer.convert_tokens_to_ids(t) for t in ("<｜User｜>", "<｜Assistant｜>", "<think>"))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        ids = [token for token in ids if token != tokenizer.pad_token_id]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        expected, in_answer = [], False
        for previous, token in zip([None, *ids], ids, strict=False):
            # an answer runs from after the prompt's `<｜Assistant｜><think>\n` up to the next <｜User｜>
            in_answer = in_answer and token != user
            expected.append(token if in_answer else IGNORE_INDEX)
            in_answer = in_answer or (previous == think and ids[ids.index(think) - 1] == assistant)
        assert labels[: len(ids)] == expected and set(labels[len(ids) :]) <= {IGNORE_INDEX}
        assert labels.count(tokenizer.eos_token_id) == 2  # each answer's end-of-sentence is learnt
        answers = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert answers == (
            "\n</think>\n\nCurrent assets minus current liabilities.<｜end▁of▁sentence｜>"
            "\n</think>\n\nLiquid assets over current liabilities.<｜end▁of▁sentence｜>"
        )


TRAIN_OUTPUTS = ("adapter", "checkpoints", "train.json", "loss.csv", "eval_loss.csv")  # as stages.train.main takes them


def training_stage(tiny_model_dir: Path, tmp_path: Path, root: Path, tokenized_with: dict | None = None, **train):
    """`stages.train.main` as dvc.yaml runs it, in `tmp_path`, on four two-turn conversations tokenized with the
    chat settings `tokenized_with` (default: params.yaml's), with the `train` settings changed."""
    import yaml

    from stages import tokenize
    from stages.train import main

    standardized = tmp_path / "standardized"
    standardized.mkdir(exist_ok=True)
    for split in ("train", "eval"):
        Dataset.from_list([{"conversations": TWO_TURNS}] * 4).to_parquet(standardized / f"{split}.parquet")
    settings = yaml.safe_load((root / "params.yaml").read_text())
    settings["model"] |= {"model_name": str(tiny_model_dir), "max_seq_length": 256}
    settings["train"] |= train
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings | {"chat": tokenized_with or settings["chat"]}))
    tokenize.main(tmp_path / "params.yaml", standardized, tmp_path / "tokenized", tmp_path / "tokenize.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    return lambda: main(tmp_path / "params.yaml", tmp_path / "tokenized", *(tmp_path / name for name in TRAIN_OUTPUTS))


def failing_training(tiny_model_dir: Path, tmp_path: Path, root: Path):
    """A training that fails after its run started, when it checks its tokenizer against the data: the token ids
    were made by another chat setting (think blocks left out)."""
    return training_stage(tiny_model_dir, tmp_path, root, tokenized_with={"template": None, "think": "none"})


def test_a_failed_run_is_failed_and_leaves_no_folder_and_one_killed_before_any_checkpoint_is_killed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str, root: Path
) -> None:
    import mlflow

    def started() -> list[mlflow.entities.Run]:  # oldest first
        found = mlflow.search_runs(experiment_names=["finance-deepseek"], output_format="list")
        return sorted(found, key=lambda r: r.info.start_time)

    def statuses() -> list[str]:
        return [r.info.status for r in started()] if (tmp_path / "mlflow.db").exists() else []

    monkeypatch.chdir(tmp_path)
    train = failing_training(tiny_model_dir, tmp_path, root)
    for _ in range(2):  # the same settings and data each time, and no checkpoint to resume from
        with pytest.raises(ValueError, match="encoded by another tokenizer or chat template than this model's"):
            train()
        assert list((tmp_path / "checkpoints").iterdir()) == []  # nothing to resume from: no folder left behind
    assert statuses() == ["FAILED", "FAILED"]  # a failed run stays failed when the training is tried again

    # a training killed (SIGKILL) before its first checkpoint: its run's guard marks the run KILLED; killed with its
    # guard, the run stays RUNNING until the next attempt marks it KILLED
    killed = tmp_path / "killed"
    killed.mkdir()
    training_stage(tiny_model_dir, killed, root, max_steps=100_000, save_steps=None, eval_steps=None)
    outputs = zip(("--adapter", "--checkpoints", "--metrics", "--plot", "--eval-plot"), TRAIN_OUTPUTS, strict=True)
    command = [sys.executable, "-m", "stages.train", "--params", "params.yaml", "--data", "tokenized"]
    command += [part for flag, name in outputs for part in (flag, name)]
    attempts = (  # (status while training, the guard killed too, status once killed)
        (["FAILED", "FAILED", "RUNNING"], True, ["FAILED", "FAILED", "RUNNING"]),
        (["FAILED", "FAILED", "KILLED", "RUNNING"], False, ["FAILED", "FAILED", "KILLED", "KILLED"]),
    )
    for training, with_guard, after in attempts:
        with (killed / "train.log").open("w") as log:
            environ = os.environ | {"PYTHONPATH": str(root)}
            process = subprocess.Popen(command, cwd=killed, env=environ, stdout=log, stderr=log)
            deadline = time.monotonic() + 300
            while statuses() != training and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            guards = [c for c in psutil.Process(process.pid).children() if "guard.py" in " ".join(c.cmdline())]
            assert len(guards) == 1, (killed / "train.log").read_text()[-3000:]  # python .../tracking/guard.py
            if with_guard:
                guards[0].kill()
            process.kill()
        assert process.wait() == -signal.SIGKILL, (killed / "train.log").read_text()[-3000:]
        deadline = time.monotonic() + 120
        while statuses() != after and time.monotonic() < deadline:  # the guard, where alive, marks the run
            time.sleep(0.5)
        assert statuses() == after, (killed / "train.log").read_text()[-3000:]
        assert not (killed / "adapter").exists()


@pytest.mark.parametrize("padding_free", [False, True])
def test_each_step_logs_its_tokens_per_second_and_padding_share(
    padding_free: bool, tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    conversations = [
        [{"role": "user", "content": "Why? " * (1 + 7 * (i % 4))}, {"role": "assistant", "content": "So."}]
        for i in range(16)
    ]
    # questions 1 to 22 words long; 2 steps of 2 x 4 conversations: the whole epoch
    config = replace(TRAIN, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    trainer, rows = tiny_trainer(model_config, conversations, config, tmp_path)
    tokenizer = trainer.processing_class
    assert batching_tags(trainer.args, model_config) == {"fit.batching": "padded", "fit.attention": "sdpa"}  # the CPU
    if padding_free:  # as on CUDA (unsloth's CPU backend turns padding-free batching off): one row, no attention mask
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer.data_collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    batches, collate = [], trainer.data_collator  # each micro-batch's tokens and positions, as collated

    def collated(features: list[dict]) -> dict:
        batch = collate(features)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        batches.append((int(mask.sum()), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = collated
    trainer.train()
    logged = loss_rows(trainer.state.log_history)
    assert len(logged) == 2 and all(row["tokens_per_second"] > 0 for row in logged)
    assert trainer.state.num_input_tokens_seen == sum(len(ids) for ids in rows["input_ids"])  # each token once
    steps = [batches[:4], batches[4:]]  # 4 micro-batches a step
    expected = [1 - sum(t for t, _ in step) / sum(p for _, p in step) for step in steps]
    assert len(batches) == 8 and [row["padding_share"] for row in logged] == pytest.approx(expected)
    assert all(share == 0 for share in expected) if padding_free else all(share > 0 for share in expected)


def test_a_checkpoints_save_is_not_counted_as_training_time(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """A save follows its step's log: its time fell into the next step's tokens per second, which a checkpoint of
    the 8B (seconds to write) pulled down."""
    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    config = replace(TRAIN, max_steps=2, logging_steps=1, save_steps=1, per_device_train_batch_size=4)
    trainer, _ = tiny_trainer(model_config, toy_conversations(12), config, tmp_path)
    save = trainer._save_optimizer_and_scheduler  # a slow disk: each save takes 3 s more

    def slow_save(*args: Any, **kwargs: Any) -> None:
        time.sleep(3)
        save(*args, **kwargs)

    trainer._save_optimizer_and_scheduler = slow_save
    trainer.train()
    logged = [row for row in trainer.state.log_history if "tokens_per_second" in row]
    seen = [0] + [row["num_input_tokens_seen"] for row in logged]
    steps = zip(seen, seen[1:], logged, strict=False)  # seen has one entry more
    seconds = [(after - before) / row["tokens_per_second"] for before, after, row in steps]
    assert len(seconds) == 2 and seconds[1] < 3, seconds  # step 2 came after a save (step 1: the warm-up too)


def test_a_resumed_training_goes_on_with_its_adapter_in_the_dtype_it_trained_in(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """On a GPU unsloth trains the adapter in the model's 16-bit dtype, and peft loads a checkpoint's adapter in
    float32 (`autocast_adapter_dtype`): the trainer casts it back, so a resumed training goes on in the precision it
    started in. (On the CPU unsloth keeps the adapter in float32: the 16-bit adapter is made here.)"""
    from safetensors.torch import load_file

    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    config = replace(TRAIN, max_steps=1, save_steps=1)
    trainer, _ = tiny_trainer(model_config, toy_conversations(8), config, tmp_path / "first")
    trainer.train()
    checkpoint = tmp_path / "first" / "checkpoint-1"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    resumed, _ = tiny_trainer(model_config, toy_conversations(8), config, tmp_path / "second")
    adapter = {name: p for name, p in resumed.model.named_parameters() if p.requires_grad}
    for parameter in adapter.values():
        parameter.data = parameter.data.to(torch.bfloat16)
    resumed._load_from_checkpoint(str(checkpoint))
    loaded = {name: p for name, p in resumed.model.named_parameters() if p.requires_grad}
    assert loaded.keys() == adapter.keys() and {p.dtype for p in loaded.values()} == {torch.bfloat16}
    assert len(saved) == len(loaded)
    for name, parameter in loaded.items():  # the checkpoint's weights, rounded to 16 bits
        assert torch.equal(parameter.data, saved[name.replace(".default", "")].to(torch.bfloat16)), name


def test_dataloader_workers_collate_the_same_batches_in_the_same_order(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """`train.dataloader_num_workers`: worker processes collate the next batches while the model trains, and the
    training is the one of the training process collating them itself: the same tokens a step, the same losses."""
    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    conversations = [
        [{"role": "user", "content": "Why? " * (1 + 5 * (i % 5))}, {"role": "assistant", "content": "So."}]
        for i in range(24)
    ]
    runs = []
    for workers in (0, 2):
        config = replace(
            TRAIN, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            train_sampling_strategy="batch_rebalance", dataloader_num_workers=workers,
        )  # fmt: skip
        trainer, _ = tiny_trainer(model_config, conversations, config, tmp_path / f"workers-{workers}")
        assert trainer.get_train_dataloader().num_workers == workers
        assert type(trainer._get_train_sampler()) is BatchRebalanceSampler  # padded batches: by transformers' cost
        trainer.args.padding_free = True  # as on CUDA: dealt by tokens
        assert type(trainer._get_train_sampler()) is TokenSampler
        trainer.args.padding_free = False
        trainer.train()
        logged = [row for row in trainer.state.log_history if "loss" in row]
        runs.append(([row["num_input_tokens_seen"] for row in logged], [row["loss"] for row in logged]))
    (tokens, losses), (tokens_with_workers, losses_with_workers) = runs
    assert len(tokens) == 3 and tokens_with_workers == tokens
    assert losses_with_workers == pytest.approx(losses, rel=1e-6), runs


def test_the_token_sampler_deals_each_shuffled_step_by_tokens_each_process_its_own_micro_batches() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(16)]
    dealt = [list(TokenSampler(lengths, 8, dp_size=2, grad_accum=2, seed=3, rank=rank)) for rank in (0, 1)]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3)).tolist()  # transformers' shuffle
    for step in range(2):  # 2 steps of 8 conversations: 2 micro-batches on each of 2 processes
        indices = order[8 * step : 8 * step + 8]
        expected = split_step_by_tokens(indices, [lengths[i] for i in indices], ranks=2, slots=2)
        assert [rank[2 * step : 2 * step + 2] for rank in dealt] == expected


def test_a_step_in_passes_of_so_many_tokens_trains_as_the_step_in_one_pass(
    tiny_model_dir: Path, tmp_path: Path, mlflow_store: str
) -> None:
    """`train.micro_batch_tokens`: each pass's loss is summed over the whole micro-batch's tokens, so a step cut
    into passes logs the loss and gradient norm of the step run whole (float32, the CPU's padded batches)."""
    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=False, dtype="float32")
    conversations = [
        [{"role": "user", "content": "Why? " * (1 + 6 * (i % 4))}, {"role": "assistant", "content": "So it is."}]
        for i in range(16)
    ]
    runs = []
    for tokens in (None, 256):  # 256: two or three of these padded rows a pass
        config = replace(TRAIN, max_steps=2, per_device_train_batch_size=8, micro_batch_tokens=tokens)
        trainer, _ = tiny_trainer(model_config, conversations, config, tmp_path / f"tokens-{tokens}")
        if tokens:  # the first step's batch takes several passes
            assert len(cut_by_tokens(next(iter(trainer.get_train_dataloader())), tokens)) > 1
        trainer.train()
        runs.append(
            [value for row in loss_rows(trainer.state.log_history) for value in (row["loss"], row["grad_norm"])]
        )
    whole, cut = runs
    assert len(whole) == 4 and cut == pytest.approx(whole, rel=1e-5), runs


@pytest.mark.parametrize(
    ("learning_rate", "seen"),
    [
        (1.0e30, "loss nan"),  # the loss goes non-finite first: the log step stops the training
        (1.0e39, "adapter weights not finite"),  # the weights first, the loss still finite: no checkpoint of them
    ],
)
def test_a_diverged_training_fails_its_run_and_writes_no_adapter(
    learning_rate: float,
    seen: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
    root: Path,
) -> None:
    import mlflow
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    settings = {"learning_rate": learning_rate, "warmup_steps": 0, "optim": "adamw_torch", "max_steps": 8}
    train = training_stage(tiny_model_dir, tmp_path, root, **settings, save_steps=1, eval_steps=None)
    with pytest.raises(FloatingPointError, match=rf"training diverged at step \d+: {seen}"):
        train()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train.json").exists()
    (run,) = mlflow.search_runs(experiment_names=["finance-deepseek"], output_format="list")
    assert run.info.status == "FAILED" and "adapter_sha256" not in run.data.tags
    assert not mlflow.MlflowClient().search_model_versions()  # nothing registered
    logged = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert all(math.isfinite(loss) for loss in logged[:-1])
    assert math.isfinite(logged[-1]) == (seen != "loss nan")  # a non-finite loss is shown, not hidden
    saved = sorted((tmp_path / "checkpoints").glob("*/checkpoint-*/adapter_model.safetensors"))
    assert len(saved) == len(logged) - 1  # each step's checkpoint but the diverged one's
    assert all(torch.isfinite(t).all() for path in saved for t in load_file(path).values())


def test_unknown_target_modules_and_optimizers_are_refused_by_name_before_the_run_starts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str, root: Path
) -> None:
    import mlflow

    model_config = ModelConfig(str(tiny_model_dir), None, 256, load_in_4bit=True, dtype=None)
    check_names(model_config, LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"]), TRAIN)
    with pytest.raises(ValueError, match=r"lora.target_modules\[1\] is 'qproj', which names no linear layer .*k_proj"):
        check_names(model_config, LoraConfig(r=4, target_modules=["q_proj", "qproj"]), TRAIN)
    monkeypatch.chdir(tmp_path)
    train = training_stage(tiny_model_dir, tmp_path, root, optim="adamw_9bit")
    with pytest.raises(ValueError, match="train.optim 'adamw_9bit' is not one of transformers': .*adamw_8bit"):
        train()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # not an earlier test's store
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # stopped before its run


def test_a_full_disk_is_told_from_other_errors_whichever_library_wrote() -> None:
    import errno

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(Exception("No space left on device (os error 28)"))  # tokenizers' Rust writer
    assert disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from cause
    except RuntimeError as chained:
        assert disk_full(chained)  # torch.save's message, from the OSError underneath
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("loss nan"))
