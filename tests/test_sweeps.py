"""Sweeps: a grid of queued experiments run by four DVC queue workers at once on the demo's settings, each its own
MLflow run in the project's SQLite store, one killed on the way; the best found by tools.compare; a model folder
that an experiment's copy lacks, named.

The grid and commands are those of docs/experiments.md's sweep, with the tiny model copied into each experiment
(`-C`: git does not track it) and only the train stage run (`train` as the target), to keep the test short.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from test_pipeline import clean_env, dvc, repo, run, runs  # noqa: F401  (repo: the fixture, reused)

from finetune.training.leases import running_workers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRID = ["-S", "lora.r=4,8,16,32", "-S", "train.learning_rate=1.0e-4,2.0e-4"]  # 8 experiments, as documented
TINY = "models/tiny-deepseek"
WORKERS = "4"


def queue_logs(project: Path) -> dict[str, str]:
    """Each queued experiment's output by name: the files `dvc queue logs <name>` prints."""
    logs = {}
    for path in (project / ".dvc/tmp/exps/run").glob("*/*.out"):
        text = path.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"Reproducing experiment '([^']+)'", text)
        if name:
            logs[name[1]] = text
    return logs


def wait_for(condition: Callable[[], bool], what: str, project: Path, seconds: float = 1200) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: waited {seconds} s\n{dvc('queue', 'status', cwd=project)}"
        time.sleep(1)


@pytest.fixture(scope="module")
def swept(repo: Path) -> Iterator[Path]:  # noqa: F811  (the fixture)
    """The demo project with its data stages run and committed (2 training steps, no evaluation during training),
    an experiment queued to be killed, then the grid; four workers run them, and `killed` is killed while training."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"] |= {"max_steps": 2, "warmup_steps": 0, "eval_steps": None, "save_steps": None}  # lr from step 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("repro", "tokenize", cwd=repo)  # once: every experiment starts from these
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data stages, short trainings"], repo)
    dvc("exp", "run", "--queue", "-n", "killed", "-S", "train.max_steps=100000", "-C", TINY, "train", cwd=repo)
    dvc("exp", "run", "--queue", *GRID, "-C", TINY, "train", cwd=repo)
    start = time.monotonic()
    # its output not captured: the workers it starts in the background hold on to what they inherit, a pipe would
    # stay open until the queue is done; one thread each: four trainings on two cores (a thread per core thrashes)
    environ = clean_env() | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dvc", "queue", "start", "-j", WORKERS]
    subprocess.run(command, cwd=repo, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    try:
        # `killed` once it trains: stopped as `dvc queue kill` stops it (SIGINT), which also ends its worker; the
        # other three take the rest of the queue
        wait_for(lambda: "{'loss': " in queue_logs(repo).get("killed", ""), "killed", repo)
        dvc("queue", "kill", "killed", cwd=repo)
        wait_for(lambda: running_workers(repo) == 0, "the queue", repo)  # each worker ends once the queue is empty
        wait_for(lambda: not re.search(r"\b(Running|Queued)$", dvc("queue", "status", cwd=repo), re.M), "status", repo)
        print(f"\n{len(queue_logs(repo))} experiments on {WORKERS} workers: {time.monotonic() - start:.0f} s")
        yield repo
    finally:
        stop(repo)


def stop(project: Path) -> None:
    """Stop the queue and every process of its experiments (`dvc queue stop --kill` would leave their trainings
    running: it kills DVC's process, not the stage's)."""
    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=project, env=clean_env(), check=False)
    copies = project / ".dvc/tmp/exps"
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if Path(process.cwd()).is_relative_to(copies):
                process.kill()


def test_eight_experiments_on_four_workers_each_finish_as_one_mlflow_run(swept: Path) -> None:
    status = dvc("queue", "status", cwd=swept)
    finished = {line.split()[1] for line in status.splitlines() if line.endswith("Success")}
    failed = {line.split()[1] for line in status.splitlines() if line.endswith("Failed")}
    assert len(finished) == 8 and failed == {"killed"}, status

    found = runs(swept)
    assert sorted(r.info.run_name for r in found) == sorted([*finished, "killed"])  # one run per experiment
    by_name = {r.info.run_name: r for r in found}
    assert all(by_name[name].info.status == "FINISHED" for name in finished)
    assert by_name["killed"].info.status in ("FAILED", "KILLED")
    baseline = run(["git", "rev-parse", "HEAD"], swept).strip()
    assert {r.data.tags["sweep"] for r in found} == {baseline[:7]}  # grouped in the UI's sweeps view
    assert {r.data.tags["fit.gpus"] for r in found} == {"none"}  # the CPU: nothing to lease
    client = mlflow.MlflowClient()
    for name in finished:  # each trained its own two steps from the start: no checkpoint folder shared or resumed
        assert "resumed_from" not in by_name[name].data.tags
        assert [m.step for m in client.get_metric_history(by_name[name].info.run_id, "loss")] == [1, 2]
    versions = client.search_model_versions("name = 'finance-deepseek-adapter'")
    assert sorted(v.run_id for v in versions) == sorted(by_name[name].info.run_id for name in finished)

    logs = queue_logs(swept)
    assert set(logs) == {*finished, "killed"}
    assert not [name for name, text in logs.items() if "database is locked" in text]
    workers = [int(count) for text in logs.values() for count in re.findall(r"(\d+) queue workers running", text)]
    assert WORKERS in map(str, workers) and max(workers) == int(WORKERS), workers  # the share of `auto` on a GPU


def test_compare_names_the_best_experiment_and_the_command_that_applies_it(swept: Path) -> None:
    compare = [sys.executable, "-m", "tools.compare"]
    lines = run([*compare, "--best", "train_loss"], swept).splitlines()
    name = re.fullmatch(r"Best of 8 experiments by train_loss \(lowest\): (\S+), train_loss = \S+", lines[0])[1]
    # the settings that tell it apart: max_steps too, since `killed` had 100000
    assert re.fullmatch(r"Its settings: lora.r=\d+, train.learning_rate=\S+, train.max_steps=2", lines[1])
    assert lines[2] == f"Apply it: dvc exp apply {name}"
    losses = {r.info.run_name: r.data.metrics["train/train_loss"] for r in runs(swept) if r.info.status == "FINISHED"}
    assert losses[name] == min(losses.values())
    table = run([*compare, "--sort", "train_loss"], swept).splitlines()
    first = next(i for i, line in enumerate(table) if line.startswith("experiment")) + 1
    assert table[first].split()[0] == name and table[first - 1].split()[-1] == "train_loss"  # its own column


def test_a_model_folder_that_the_experiments_copy_lacks_is_named_with_the_fix(swept: Path) -> None:
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "train.max_steps=1", "train"]  # no -C
    result = subprocess.run(command, cwd=swept, env=clean_env(), capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"model.model_name: {TINY} is in the workspace ({swept / TINY})" in output, output[-3000:]
    assert f"`-C {TINY}`" in output and "huggingface.co" not in output
