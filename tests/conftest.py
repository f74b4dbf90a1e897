"""Shared fixtures: the project root, the embedded sample, and the tiny DeepSeek-architecture model.

unsloth is imported first, as in the stages: it patches transformers, trl and peft when it loads.
"""

from __future__ import annotations

import unsloth  # noqa: F401, I001  # isort: skip

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no browser download); `.ci/run` installs the package.

    The MLflow UI test (tests/test_pipeline.py) and the offline plots test (tests/test_plots.py) use it.
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for the MLflow UI test (see .ci/run)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1600, "height": 900})
        # MLflow's assistant panel opens itself on a first visit and covers the page: keep it closed
        context.add_init_script(
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        )
        yield context
        browser.close()
