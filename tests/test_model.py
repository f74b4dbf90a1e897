"""model: evaluate, export and generate load the base in the precision the adapter was trained in."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.model import PRECISION_FILE, ModelConfig, load_base, record_precision, trained_precision

CONFIG = ModelConfig("m", None, 2048, load_in_4bit="auto", dtype=None)


@pytest.mark.parametrize("trained", [True, False])
def test_the_precision_recorded_at_training_is_the_one_loaded(tmp_path: Path, trained: bool) -> None:
    record_precision(tmp_path, ModelConfig("m", None, 2048, load_in_4bit=trained, dtype=None))
    assert (tmp_path / PRECISION_FILE).is_file()
    assert trained_precision(CONFIG, tmp_path).load_in_4bit is trained  # `auto` decided as at training
    written = ModelConfig("m", None, 2048, load_in_4bit=not trained, dtype=None)
    assert trained_precision(written, tmp_path).load_in_4bit is trained  # the adapter's, not params.yaml's


def test_an_adapter_without_a_record_needs_an_explicit_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not record the precision .* set model.load_in_4bit to true or false"):
        trained_precision(CONFIG, tmp_path)
    four_bit = ModelConfig("m", None, 2048, load_in_4bit=True, dtype=None)
    assert trained_precision(four_bit, tmp_path) == four_bit


def test_auto_is_decided_before_loading() -> None:
    with pytest.raises(ValueError, match="model.load_in_4bit must be decided before loading"):
        load_base(CONFIG)
