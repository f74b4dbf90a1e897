"""Which stages an edit of each code file makes stale, as `dvc status` names them: the table below, checked by
editing every file of the project in a scratch copy whose `dvc.lock` is up to date.

A stage reruns for a code file it imports and for no other: the speed patch is no dependency of tokenize (771 M
tokens), the MLflow UI's columns none of train or evaluate, a tool or speed script none of any stage. A new code file
must get its row here.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

ALL = {"fetch", "to_sharegpt", "standardize", "tokenize", "train", "benchmarks", "evaluate", "export"}
MODEL = {"train", "evaluate"}  # the stages that load the model and track their runs
NONE: set[str] = set()

RERUNS = {
    # config: every stage reads its section and its paths through these
    "finetune/config/cli.py": ALL,
    "finetune/config/params.py": ALL,
    "finetune/config/schema.py": NONE,  # params.schema.json's writer (tools/params_schema.py)
    "finetune/config/workspace.py": {"fetch", "tokenize", *MODEL},  # a local path a DVC experiment's copy lacks
    # data
    "finetune/data/files.py": ALL,  # every stage writes its metrics JSON with it
    "finetune/data/parallel.py": {"fetch", "to_sharegpt", "standardize", "tokenize", "benchmarks"},
    "finetune/data/sources.py": {"fetch", "benchmarks"},
    "finetune/data/cleaning.py": {"fetch"},
    "finetune/data/near_copies.py": {"fetch"},
    "finetune/data/conversion.py": {"to_sharegpt"},
    "finetune/data/sharegpt.py": {"to_sharegpt"},
    # tokens
    "finetune/tokens/chat.py": {"tokenize", *MODEL},
    "finetune/tokens/encode.py": {"tokenize"},
    "finetune/tokens/shards.py": {"tokenize"},
    # model
    "finetune/model/load.py": {"tokenize", *MODEL, "export"},
    "finetune/model/compiled_blocks.py": {"train"},  # padding-free rows into unsloth's compiled blocks
    "finetune/model/patches.py": MODEL,  # the speed patches (flash varlen, grouped decode attention): not tokenize
    "finetune/model/fit.py": {"train"},
    # training
    "finetune/training/adapter.py": MODEL,  # evaluate checks the adapter with its finite-weights check
    "finetune/training/batching.py": {"train"},
    "finetune/training/callbacks.py": {"train"},
    "finetune/training/checkpoints.py": {"train"},
    "finetune/training/config.py": {"train"},
    "finetune/training/data.py": {"train"},
    "finetune/training/distributed.py": MODEL,  # processes, one per GPU: train, evaluate
    "finetune/training/failures.py": {"train"},
    "finetune/training/leases.py": MODEL,  # GPU leases; the MLflow store's lock (tracking/store.py)
    "finetune/training/trainer.py": {"train"},
    # tracking
    "finetune/tracking/store.py": MODEL,
    "finetune/tracking/records.py": MODEL,
    "finetune/tracking/adapter_run.py": MODEL,  # train tags the adapter's digest, evaluate finds the run by it
    "finetune/tracking/training_run.py": {"train"},
    "finetune/tracking/guard.py": {"train"},  # the run's guard: KILLED when the training's process dies
    "finetune/tracking/ui.py": NONE,  # the UI's columns: the UI launcher's alone
    # evaluation
    "finetune/evaluation/benchmark_sets.py": {"benchmarks"},
    "finetune/evaluation/contamination.py": {"fetch", "benchmarks"},  # fetch finds held-out answers with it
    "finetune/evaluation/numbers.py": {"benchmarks", "evaluate"},  # references read, generated answers scored
    "finetune/evaluation/benchmark_items.py": {"evaluate"},
    "finetune/evaluation/numeric_sets.py": {"evaluate"},
    "finetune/evaluation/answers.py": {"evaluate"},
    "finetune/evaluation/base_vs_tuned.py": {"evaluate"},
    "finetune/evaluation/label_sets.py": {"evaluate"},
    "finetune/evaluation/likelihood.py": {"evaluate"},
    "finetune/evaluation/scoring.py": {"evaluate"},
    # each stage's recipe: itself
    **{f"stages/{stage}.py": {stage} for stage in ALL},
    # tools and speed scripts: nothing
    **{f"tools/{name}.py": NONE for name in ("compare", "deps", "generate", "mlflow_ui", "params_schema")},
    "tools/vega_page.py": NONE,
    **{f"tools/servers/{name}.py": NONE for name in ("__main__", "process", "s3", "postgres", "mlflow_server", "team")},
    **{
        f"perf/{name}.py": NONE
        for name in (
            *("contamination_speed", "data_stages", "decode_speed", "evaluate_speed", "gaps", "lora_paths"),
            "lora_products",
            *("quantized", "shapes", "stand_ins", "train_baselines", "train_measure", "train_speed", "train_table"),
        )
    },
}


def code_files(root: Path) -> set[str]:
    """Every Python file of the project's code but the packages' `__init__.py` (empty, or names from its modules)."""
    folders = ("stages", "finetune", "tools", "perf")
    return {str(path.relative_to(root)) for folder in folders for path in (root / folder).rglob("*.py")} - {
        str(path.relative_to(root)) for path in root.glob("*/**/__init__.py")
    }


def stand_in_outputs(root: Path) -> None:
    """A file (or a folder holding one) at every output of every stage, so that DVC can record the lock."""
    for name in ("dvc.yaml", "export/dvc.yaml"):
        folder = (root / name).parent
        for stage in yaml.safe_load((root / name).read_text())["stages"].values():
            for out in stage.get("outs", []) + stage.get("metrics", []):
                path = folder / stage.get("wdir", ".") / (out if isinstance(out, str) else next(iter(out)))
                target = path if path.suffix else path / "stand-in"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("stand-in\n")


@pytest.fixture(scope="module")
def scratch(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's files (tracked, or new and not ignored) in a git repo of their own, every stage locked."""
    from dvc.repo import Repo

    copy = tmp_path_factory.mktemp("reruns")
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (root / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    stand_in_outputs(copy)
    with contextlib.chdir(copy), Repo(str(copy)) as repo:  # DVC resolves a stage's wdir from the working folder
        repo.commit(force=True)  # dvc.lock as if every stage had run on these files
        assert repo.status() == {}
    return copy


def stale_after_editing(copy: Path, name: str) -> set[str]:
    """The stages `dvc status` names once a line is added to the file `name`, which is then put back."""
    from dvc.repo import Repo

    path = copy / name
    original = path.read_bytes()
    path.write_bytes(original + b"# an edit\n")
    try:
        with contextlib.chdir(copy), Repo(str(copy)) as repo:
            status = repo.status()
    finally:
        path.write_bytes(original)
    return {stage.split(":")[-1] for stage in status}  # "export/dvc.yaml:export" -> "export"


def test_the_table_names_every_code_file(root: Path) -> None:
    assert set(RERUNS) == code_files(root), "add the new file to RERUNS (and check the stages it makes stale)"


def test_each_edit_makes_stale_exactly_the_stages_of_the_table(scratch: Path) -> None:
    found = {name: stale_after_editing(scratch, name) for name in sorted(RERUNS)}
    wrong = {
        name: f"{sorted(stages)} != {sorted(RERUNS[name])}" for name, stages in found.items() if stages != RERUNS[name]
    }
    assert not wrong, wrong
