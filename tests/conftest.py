"""Shared fixtures: the project root, the embedded sample, and the tiny DeepSeek-architecture model.

unsloth is imported first, as in the stages: it patches transformers, trl and peft when it loads.
"""

from __future__ import annotations

import unsloth  # noqa: F401, I001  # isort: skip

import json
from pathlib import Path

import pytest

from demo.tiny_model import build_model, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "finance_instruct_sample.jsonl"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, sample_rows: list[dict[str, str]]) -> Path:
    """The demo's tiny model, built once per test session the way `python -m demo.tiny_model` builds it."""
    out = tmp_path_factory.mktemp("tiny-deepseek")
    texts = [row[column] for row in sample_rows for column in ("system", "user", "assistant")]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    build_model(tokenizer, hidden_size=64, num_layers=2, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
