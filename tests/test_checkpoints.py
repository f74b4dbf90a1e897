"""checkpoints: only complete checkpoints of the same settings and data are ever resumed from, and on a base of the
precision they were trained on."""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.model.load import PRECISION_FILE, ModelConfig
from finetune.training import checkpoints
from finetune.training.data import attempt_speed


def test_the_fingerprint_changes_with_any_setting_or_data_digest() -> None:
    settings = {"lora.r": 4, "train.learning_rate": 2.0e-4}
    data = {"training": "0f3a", "evaluation": "77b1"}
    first = checkpoints.fingerprint(settings, data)
    assert checkpoints.fingerprint(dict(reversed(settings.items())), data) == first  # key order is irrelevant
    assert checkpoints.fingerprint(settings | {"lora.r": 8}, data) != first
    assert checkpoints.fingerprint(settings, data | {"training": "0f3b"}) != first


def newest(folder: Path, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    start.wait()
    try:
        out.put(str(checkpoints.latest(folder)))
    except OSError as error:
        out.put(repr(error))


@pytest.mark.slow  # processes
def test_the_processes_of_one_training_delete_an_incomplete_checkpoint_together(tmp_path: Path) -> None:
    """Every rank of a multi-GPU resume looks for the checkpoint at once: each used to trip over files another
    had just deleted (FileNotFoundError in one rank of two, every trial of ten)."""
    context = multiprocessing.get_context("spawn")
    for trial in range(5):
        folder = tmp_path / str(trial)
        (folder / "checkpoint-20").mkdir(parents=True)
        checkpoints.mark_complete(folder, 20)
        (folder / "checkpoint-30").mkdir()  # killed while saving: hundreds of files to delete
        for i in range(400):
            (folder / "checkpoint-30" / f"shard-{i}").write_bytes(b"half")
        start, out = context.Barrier(4), context.Queue()
        ranks = [context.Process(target=newest, args=(folder, start, out)) for _ in range(4)]
        for rank in ranks:
            rank.start()
        found = [out.get(timeout=60) for _ in ranks]
        for rank in ranks:
            rank.join()
        assert found == [str(folder / "checkpoint-20")] * 4
        assert not (folder / "checkpoint-30").exists()


def test_a_checkpoints_step_is_read_from_its_name() -> None:
    assert checkpoints.checkpoint_step(Path("models/checkpoints/0a1b/checkpoint-20")) == 20
    assert checkpoints.checkpoint_step(None) == 0  # no checkpoint: the training starts at step 0


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


def test_a_resumed_attempts_speed_counts_the_samples_of_its_own_steps() -> None:
    """The Trainer divides the samples of all max_steps by the time of the steps this attempt ran."""
    trainer_says = {"train_runtime": 10.0, "train_samples_per_second": 12.0, "train_loss": 1.0}  # 30 steps x 4
    assert attempt_speed(trainer_says, steps_run=10, max_steps=30) == {
        "train_runtime": 10.0,
        "train_samples_per_second": 4.0,  # 10 steps x 4 conversations in 10 s
    }
    assert attempt_speed(trainer_says, 30, 30)["train_samples_per_second"] == 12.0  # uninterrupted: as it says
