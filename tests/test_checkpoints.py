"""checkpoints: only complete checkpoints of the same settings and data are ever resumed from, and on a base of the
precision they were trained on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.model.load import PRECISION_FILE, ModelConfig
from finetune.training import checkpoints


def test_the_fingerprint_changes_with_any_setting_or_data_digest() -> None:
    settings = {"lora.r": 4, "train.learning_rate": 2.0e-4}
    data = {"training": "0f3a", "evaluation": "77b1"}
    first = checkpoints.fingerprint(settings, data)
    assert checkpoints.fingerprint(dict(reversed(settings.items())), data) == first  # key order is irrelevant
    assert checkpoints.fingerprint(settings | {"lora.r": 8}, data) != first
    assert checkpoints.fingerprint(settings, data | {"training": "0f3b"}) != first


def test_latest_takes_the_newest_complete_checkpoint_and_deletes_incomplete_ones(tmp_path: Path) -> None:
    for step in (5, 10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    checkpoints.mark_complete(tmp_path, 5)
    checkpoints.mark_complete(tmp_path, 10)
    (tmp_path / "checkpoint-20" / "optimizer.pt").write_bytes(b"half")  # killed while saving
    assert checkpoints.latest(tmp_path) == tmp_path / "checkpoint-10"  # 10 > 5, numerically
    assert not (tmp_path / "checkpoint-20").exists()


def test_no_folder_or_no_complete_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert checkpoints.latest(tmp_path / "absent") is None
    (tmp_path / "checkpoint-3").mkdir()
    assert checkpoints.latest(tmp_path) is None


def test_the_run_id_of_an_earlier_attempt_is_remembered(tmp_path: Path) -> None:
    assert checkpoints.run_id(tmp_path / "f") is None
    checkpoints.remember_run(tmp_path / "f", "abc123")
    assert checkpoints.run_id(tmp_path / "f") == "abc123"


def test_a_resumed_training_keeps_the_base_precision_its_checkpoints_were_trained_on(tmp_path: Path) -> None:
    folder, checkpoint = tmp_path / "0123456789abcdef", tmp_path / "0123456789abcdef" / "checkpoint-20"
    sixteen = ModelConfig("org/base", None, 2048, load_in_4bit=False, dtype=None)  # as `auto` chose it
    four = replace(sixteen, load_in_4bit=True)
    checkpoints.keep_precision(folder, sixteen, None)  # a first training: recorded, as an adapter records its base
    record = folder / PRECISION_FILE
    written = {"load_in_4bit": False, "model_name": "org/base", "revision": None}
    assert json.loads(record.read_text()) == written
    checkpoints.keep_precision(folder, sixteen, checkpoint)  # resumed on a GPU like it
    message = (
        f"{folder}: its checkpoints were trained on a 16-bit base, but model.load_in_4bit chose 4-bit on this "
        "machine: resume on a GPU like the one that trained them, or delete the folder to train again"
    )
    with pytest.raises(ValueError) as refused:
        checkpoints.keep_precision(folder, four, checkpoint)  # `auto` decided otherwise here
    assert str(refused.value) == message and json.loads(record.read_text()) == written
    record.unlink()  # a folder of a training before the record: nothing to compare, recorded from now on
    checkpoints.keep_precision(folder, four, checkpoint)
    assert json.loads(record.read_text()) == written | {"load_in_4bit": True}
