"""Sweeps: the README's sweep, its commands as written, on the demo's settings: a grid of 4 queued experiments run by
four DVC queue workers at once, each its own MLflow run in the project's SQLite store, one more killed on the way;
the best found by tools.compare; a model folder that an experiment's copy lacks, named.

The tiny model is tracked as `make demo` tracks it (`demo.run.track`: `dvc add`, its `.dvc` file staged, nothing
committed), so that each experiment's copy checks it out of DVC's cache. The demo's settings are shortened to keep
the test short: 2 training steps, and an evaluation of 4 held-out rows with no generated answers or benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from test_pipeline import clean_env, data_stages_run, dvc, repo, run, runs  # noqa: F401  (the fixtures, reused)

from demo.run import TINY_MODEL
from finetune.training.leases import running_workers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKERS = 4  # the README's `dvc queue start -j 4`
SHORT = {  # the demo's settings, shortened
    "train": {"max_steps": 2, "warmup_steps": 0, "eval_steps": None, "save_steps": None},  # the lr from step 1
    "evaluate": {"max_rows": 4, "num_samples": 0},  # tuned_loss, which the README's `--best` ranks by, and little else
    "benchmarks": {"sets": []},
}
RUNS = Path(".dvc/tmp/exps/run")  # a folder per queued experiment that started: its output and its process's end


def readme_sweep(project: Path) -> list[list[str]]:
    """The README's sweep commands as written, each split into its words (comments dropped)."""
    readme = (project / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*Sweeps\*\*.*?```bash\n(.*?)```", readme, re.S)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def queue_logs(project: Path) -> dict[str, str]:
    """Each queued experiment's output by name: the files `dvc queue logs <name>` prints."""
    logs = {}
    for path in (project / RUNS).glob("*/*.out"):
        text = path.read_text(encoding="utf-8", errors="replace")
        name = re.search(r"Reproducing experiment '([^']+)'", text)
        if name:
            logs[name[1]] = text
    return logs


def ended(project: Path) -> int:
    """The queued experiments whose process has ended: DVC writes its return code into the experiment's `.json`."""
    count = 0
    for path in (project / RUNS).glob("*/*.json"):
        with contextlib.suppress(OSError, ValueError):  # DVC is writing it
            count += json.loads(path.read_text(encoding="utf-8")).get("returncode") is not None
    return count


def wait_for(condition: Callable[[], bool], what: str, project: Path, seconds: float = 1200, poll: float = 1) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: waited {seconds} s\n{dvc('queue', 'status', cwd=project)}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def swept(repo: Path) -> Iterator[Path]:  # noqa: F811  (the fixture)
    """The demo project with its data stages run and committed and its tiny model tracked as the demo tracks it, an
    experiment queued to be killed, then the README's grid; four workers run them, and `killed` is killed while
    training."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SHORT.items():
        params[section] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("repro", "tokenize", "benchmarks", cwd=repo)  # once: every experiment starts from these
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data stages, short trainings"], repo)
    run([sys.executable, "-c", "from demo.run import TINY_MODEL, track; track(TINY_MODEL)"], repo)  # as the demo
    assert run(["git", "status", "--porcelain", f"{TINY_MODEL}.dvc"], repo).startswith("A "), "staged, not committed"
    queue, start, _ = readme_sweep(repo)
    assert queue[:4] == ["dvc", "exp", "run", "--queue"] and start == ["dvc", "queue", "start", "-j", str(WORKERS)]
    # last in line, so that nothing waits behind it when it is killed: the worker that `dvc queue kill` ends may
    # have taken the next experiment as it went, which then shows Running with no worker and never runs (seen once,
    # 2026-12-04). Like the grid, no target stage: with one, DVC would check out only that stage's inputs, which the
    # tiny model is not (it is a setting's value)
    run(queue, repo)
    dvc("exp", "run", "--queue", "-n", "killed", "-S", "train.max_steps=100000", cwd=repo)
    began = time.monotonic()
    # its output not captured: the workers it starts in the background hold on to what they inherit, a pipe would
    # stay open until the queue is done; one thread each: four trainings on two cores (a thread per core thrashes)
    environ = clean_env() | {"OMP_NUM_THREADS": "1"}
    subprocess.run(start, cwd=repo, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    try:
        # `killed` once it trains, after a worker of the grid took it: stopped as `dvc queue kill` stops it (SIGINT),
        # which also ends its worker; the same `dvc queue start -j 4` again finds the queue empty and ends
        wait_for(lambda: "{'loss': " in queue_logs(repo).get("killed", ""), "killed", repo, poll=0.5)
        dvc("queue", "kill", "killed", cwd=repo)
        wait_for(lambda: running_workers(repo) < WORKERS, "its worker", repo, poll=0.5)
        subprocess.run(start, cwd=repo, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
        wait_for(lambda: ended(repo) == 5, "the queue", repo)  # each experiment's process, without asking DVC
        wait_for(lambda: not re.search(r"\b(Running|Queued)$", dvc("queue", "status", cwd=repo), re.M), "status", repo)
        print(f"\n{len(queue_logs(repo))} experiments on {WORKERS} workers: {time.monotonic() - began:.0f} s")
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


def test_four_experiments_on_four_workers_each_finish_as_one_mlflow_run(swept: Path) -> None:
    status = dvc("queue", "status", cwd=swept)
    finished = {line.split()[1] for line in status.splitlines() if line.endswith("Success")}
    failed = {line.split()[1] for line in status.splitlines() if line.endswith("Failed")}
    assert len(finished) == 4 and failed == {"killed"}, status

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
    assert WORKERS in workers and max(workers) == WORKERS, workers  # the share of `auto` on a GPU


def test_compare_names_the_best_experiment_and_the_command_that_applies_it(swept: Path) -> None:
    *_, best = readme_sweep(swept)  # python -m tools.compare --best tuned_loss
    lines = run(best, swept).splitlines()
    name = re.fullmatch(r"Best of 4 experiments by tuned_loss \(lowest\): (\S+), tuned_loss = \S+", lines[0])[1]
    # the settings that tell it apart: max_steps too, since `killed` had 100000
    assert re.fullmatch(r"Its settings: lora.r=\d+, train.learning_rate=\S+, train.max_steps=2", lines[1])
    assert lines[2] == f"Apply it: dvc exp apply {name}"
    losses = {
        r.info.run_name: r.data.metrics["evaluate/tuned_loss"] for r in runs(swept) if r.info.status == "FINISHED"
    }
    assert losses[name] == min(losses.values())


def test_a_model_folder_that_the_experiments_copy_lacks_is_named_with_the_fix(swept: Path) -> None:
    local = "models/my-model"  # neither tracked nor copied (-C)
    shutil.copytree(swept / TINY_MODEL, swept / local)
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", f"model.model_name={local}", "train"]
    result = subprocess.run(command, cwd=swept, env=clean_env(), capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"model.model_name: {local} is in the workspace ({swept / local})" in output, output[-3000:]
    assert f"dvc add {local}" in output and f"`-C {local}`" in output and "huggingface.co" not in output
