"""train: unsloth 4-bit base + LoRA via TRL's SFTTrainer; the adapter learns, the base stays frozen."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from unsloth import FastLanguageModel

from stages.model import ModelConfig, load_base
from stages.train import LoraConfig, TrainConfig, loss_rows, make_trainer

LORA = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
TRAIN = TrainConfig(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=1.0e-2,
    max_steps=25,
    num_train_epochs=1.0,
    warmup_steps=0,
    weight_decay=0.0,
    optim="adamw_torch",
    lr_scheduler_type="constant",
    logging_steps=1,
    seed=3407,
)


def toy_conversations(n: int) -> Dataset:
    """A learnable rule: whatever the question, the answer is the same sentence."""
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is the current ratio of firm {i}?"},
                    {"role": "assistant", "content": "The current ratio is current assets over current liabilities."},
                ]
            }
            for i in range(n)
        ]
    )


def test_loss_rows_keep_per_step_records_only() -> None:
    history = [
        {"loss": 2.0, "step": 1, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.1},
        {"train_runtime": 3.0, "train_loss": 2.0, "step": 1},
    ]
    assert loss_rows(history) == [{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5}]


def test_adapter_learns_and_base_stays_frozen(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_config = ModelConfig(
        model_name=str(tiny_model_dir), revision=None, max_seq_length=256, load_in_4bit=True, dtype=None
    )
    model, tokenizer = load_base(model_config)
    model = FastLanguageModel.get_peft_model(model, **LORA.__dict__)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen_before = {name: b.detach().clone() for name, b in model.state_dict().items() if "lora_" not in name}

    trainer = make_trainer(model, tokenizer, toy_conversations(32), model_config, TRAIN, tmp_path / "out")
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
