"""Shared fixtures: the project root, the embedded sample, the tiny DeepSeek-architecture tokenizer and model.

Two loops (`make test-fast`, `make test`). Tests that need a model, unsloth, a subprocess or a server are marked
`slow` (module by module: `pytestmark = pytest.mark.slow`); `make test-fast` runs the others, without importing
unsloth, and fails if one of them imports it. The whole suite imports unsloth first, before any test module
imports transformers, trl or peft: it patches them as it loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune.config.cli import exit_without_collecting

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "finance_instruct_sample.jsonl"
FAST = "not slow"  # the marker expression of `make test-fast`
SLOW_MODULE = re.compile(r"^pytestmark = .*\bslow\b", re.MULTILINE)  # a module marked slow as a whole


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller (pytest -n auto) runs no test; its workers import what they need
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker, and the stages it starts, its own compiled trainers
        folder = Path(tempfile.gettempdir()) / f"unsloth-compiled-{os.getpid()}-{os.environ['PYTEST_XDIST_WORKER']}"
        os.environ["UNSLOTH_COMPILE_LOCATION"] = str(folder)
        # and its share of the cores for torch's threads, in it and in the stages it starts: N workers of all the
        # cores each would crowd them
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if config.getoption("markexpr") != FAST:
        import unsloth  # noqa: F401  # first: it patches transformers, trl and peft

        exit_without_collecting()  # a worker's end, the suite's last seconds, as quick as a stage's


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fast loop does not even import a module marked slow as a whole: its imports (unsloth, torch models) are
    most of what makes it slow."""
    if config.getoption("markexpr") == FAST and collection_path.suffix == ".py":
        return bool(SLOW_MODULE.search(collection_path.read_text(encoding="utf-8"))) or None
    return None


# The modules that take minutes, in the order `make test` hands them to its workers (pytest-xdist's --dist loadfile
# --no-loadscope-reorder, collection order). Each worker starts with two modules, the first worker the 1st and 3rd,
# the second the 2nd and 4th; the rest go to whichever finishes first, the many short ones filling in at the end.
# test_pipeline builds the project with its data stages run (`data_stages_run`), which test_sweeps and test_team
# copy: the second worker starts with test_perf, which needs none, rather than wait for it.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_perf.py",
    "test_sweeps.py",
    "test_team.py",
    "test_distributed.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's tests keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.getoption("markexpr") == FAST and "unsloth" in sys.modules:
        pytest.exit("a test of the fast loop imported unsloth: mark its module slow (pytestmark = pytest.mark.slow)", 1)


@pytest.fixture(autouse=True)
def mlflow_as_a_fresh_process_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no MLflow store or experiment chosen. `mlflow.set_tracking_uri` and
    `mlflow.set_experiment` keep their choice in mlflow's module state and export it as MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_ID for the rest of the process: a later test of the same worker, on a store of its own, would
    start its runs under an experiment id that store lacks ("MLFLOW_EXPERIMENT_ID ... `1` does not exist")."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(key, None)
    if (fluent := sys.modules.get("mlflow.tracking.fluent")) is not None:
        monkeypatch.setattr(fluent, "_active_experiment_id", None)
    if (service := sys.modules.get("mlflow.tracking._tracking_service.utils")) is not None:
        monkeypatch.setattr(service, "_tracking_uri", None)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's own MLflow store, SQLite in its `tmp_path`, chosen as the stages choose one: MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tokenizer (DeepSeek's special tokens and chat template), trained once per test session the way
    `python -m demo.tiny_model` trains it."""
    from demo.tiny_model import corpus_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    corpus_tokenizer(SAMPLE).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny model and its tokenizer, built once per test session by `python -m demo.tiny_model`'s code."""
    from demo.tiny_model import write

    out = tmp_path_factory.mktemp("tiny-deepseek")
    write(SAMPLE, out)
    return out


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no browser download); `.ci/run` installs the package.

    The MLflow UI test (tests/test_pipeline.py) and the offline plots test (tests/test_plots.py) use it.
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for the browser tests (see .ci/run)")
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
