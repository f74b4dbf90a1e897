"""train and evaluate on several processes: torchrun started by the stage itself, the effective batch kept (train),
the items shared out and gathered (evaluate), rank 0 alone writing.

On the CPU the processes talk over gloo, as on GPUs over NCCL: the same stage command, `train.devices: 2`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from datasets import Dataset

from stages import benchmarks, tokenize
from tools.servers import free_port

pytestmark = pytest.mark.slow  # a model, unsloth, a subprocess or a server: not in make test-fast

OUTPUTS = ("adapter", "train.json", "loss.csv", "eval_loss.csv", "checkpoints")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sample_rows: list, root: Path) -> Path:
    """A folder with the tokenized sample (one-turn conversations) and params for a short training."""
    work = tmp_path_factory.mktemp("distributed")
    standardized = work / "standardized"
    standardized.mkdir()
    conversations = [
        [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        for row in sample_rows[:96]
    ]
    Dataset.from_dict({"conversations": conversations[:80]}).to_parquet(standardized / "train.parquet")
    Dataset.from_dict({"conversations": conversations[80:]}).to_parquet(standardized / "eval.parquet")
    settings = yaml.safe_load((root / "params.yaml").read_text())
    settings["model"] |= {"model_name": str(tiny_model_dir), "max_seq_length": 256}
    settings["train"] |= {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5.0e-3,
        "max_steps": 6,
        "warmup_steps": 1,
        "optim": "adamw_torch",
        "eval_steps": 3,
        "eval_rows": 8,
        "save_steps": None,
    }
    settings["tracking"]["system_metrics_seconds"] = 0.5  # samples within a training of seconds
    (work / "params.yaml").write_text(yaml.safe_dump(settings))
    tokenize.main(work / "params.yaml", standardized, work / "tokenized", work / "tokenize.json")
    return work


def start_training(
    work: Path, out: Path, devices: int, exist_ok: bool = False, environ: dict[str, str] | None = None, **train: object
) -> subprocess.Popen:
    """The train stage's command as dvc.yaml runs it, in `work`, with `train.devices` and other settings changed."""
    settings = yaml.safe_load((work / "params.yaml").read_text())
    settings["train"] |= {"devices": devices, **train}
    out.mkdir(exist_ok=exist_ok)
    (out / "params.yaml").write_text(yaml.safe_dump(settings))
    paths = dict(zip(OUTPUTS, (out / name for name in OUTPUTS), strict=True))
    command = [sys.executable, "-m", "stages.train", "--params", str(out / "params.yaml")]
    command += ["--data", str(work / "tokenized"), "--adapter", str(paths["adapter"]), "--metrics"]
    command += [str(paths["train.json"]), "--plot", str(paths["loss.csv"]), "--eval-plot", str(paths["eval_loss.csv"])]
    command += ["--checkpoints", str(paths["checkpoints"])]
    environ = (
        os.environ
        | (environ or {})
        | {
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
    )
    log = (out / "train.log").open("w")
    return subprocess.Popen(command, cwd=out, env=environ, stdout=log, stderr=subprocess.STDOUT)


def losses(path: Path) -> list[float]:
    with path.open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def runs(work: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["finance-deepseek"], output_format="list")


@pytest.fixture(scope="module")
def single(workspace: Path) -> Path:
    """The folder of a training on one process, whose loss curve the others are held to."""
    one = start_training(workspace, workspace / "one", devices=1)
    assert one.wait(timeout=600) == 0, (workspace / "one" / "train.log").read_text()[-3000:]
    return workspace / "one"


def test_two_processes_train_as_one_with_the_same_effective_batch(workspace: Path, single: Path) -> None:
    two = start_training(workspace, workspace / "two", devices=2)
    assert two.wait(timeout=600) == 0, (workspace / "two" / "train.log").read_text()[-3000:]
    log = (workspace / "two" / "train.log").read_text()
    assert "rank 1 of 2: 4 per device x 1 accumulation steps x 2 processes" in log

    # the same micro-batches in each optimizer step (two of 4 conversations), so the same curve up to float sums
    assert losses(workspace / "two" / "loss.csv") == pytest.approx(losses(single / "loss.csv"), rel=1e-3)
    # one MLflow run per training, not per process; one adapter; nothing else written, the checkpoints removed
    found = runs(workspace)
    assert sorted(run.data.tags["world_size"] for run in found) == ["1", "2"]
    assert all(run.info.status == "FINISHED" for run in found)
    written = {path.name for path in (workspace / "two").iterdir()}
    assert written == {"params.yaml", "train.log", "adapter", "train.json", "loss.csv", "eval_loss.csv", "checkpoints"}
    assert not any((workspace / "two" / "checkpoints").iterdir())
    assert (workspace / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_process_ends_the_whole_training_and_it_resumes_on_one(workspace: Path) -> None:
    import mlflow

    # time to kill it after its first save (step 2: it is watched for every 0.1 s, while a step takes ~0.5 s), and
    # few steps left for the resumed training on one process
    settings = {"max_steps": 30, "save_steps": 2, "eval_steps": None}
    training = start_training(workspace, workspace / "resumed", devices=2, **settings)
    folder = workspace / "resumed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(folder.glob("*/checkpoint-*/complete.json")) and time.monotonic() < deadline:
        time.sleep(0.1)  # both processes are training, and one checkpoint is complete
    assert training.poll() is None, (workspace / "resumed" / "train.log").read_text()[-3000:]
    workers = psutil.Process(training.pid).children()
    assert len(workers) == 2, (workspace / "resumed" / "train.log").read_text()[-3000:]
    victim = next(worker for worker in workers if worker.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    # the stage fails (rank 0 does not wait out the collective's timeout, 30 min) and leaves no process behind
    assert training.wait(timeout=120) != 0
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    log = (workspace / "resumed" / "train.log").read_text()
    assert f"Signal 9 (SIGKILL) received by PID {victim.pid}" in log, log[-3000:]  # the failure named: rank 1's kill
    assert not (workspace / "resumed" / "adapter").exists()  # the 30 steps did not run on
    started = {run.info.run_id for run in runs(workspace)}

    (workspace / "resumed" / "params.yaml").unlink()
    (workspace / "resumed" / "train.log").rename(workspace / "killed.log")
    resumed = start_training(workspace, workspace / "resumed", devices=1, exist_ok=True, **settings)
    assert resumed.wait(timeout=600) == 0, (workspace / "resumed" / "train.log").read_text()[-3000:]
    assert "resuming from" in (workspace / "resumed" / "train.log").read_text()
    assert json.loads((workspace / "resumed" / "train.json").read_text())["global_step"] == settings["max_steps"]
    after = runs(workspace)
    assert {run.info.run_id for run in after} == started  # the killed run's, continued
    continued = mlflow.MlflowClient().get_run(next(r.info.run_id for r in after if "resumed_from" in r.data.tags))
    assert continued.info.status == "FINISHED" and continued.data.tags["world_size"] == "1"


def test_a_killed_launcher_takes_its_processes_with_it(workspace: Path) -> None:
    """torchrun holds the stage's GPU lease, and its processes run in sessions of their own: killed outright (the
    out-of-memory killer), it freed the GPUs while they trained on, orphaned, for the next experiment to take."""
    training = start_training(workspace, workspace / "orphans", devices=2, max_steps=10_000, eval_steps=None)
    log = workspace / "orphans" / "train.log"
    deadline = time.monotonic() + 300
    while "rank 1 of 2" not in log.read_text() and time.monotonic() < deadline:  # both past their start
        assert training.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    workers = psutil.Process(training.pid).children()
    assert len(workers) == 2, log.read_text()[-3000:]
    training.send_signal(signal.SIGKILL)  # the stage's process is torchrun (exec)
    training.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=60)
    for worker in alive:  # orphans training on: the test ends them
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    assert not alive, f"processes {[worker.pid for worker in alive]} outlived their launcher"


def test_a_process_whose_launcher_died_before_it_started_ends_at_once(root: Path) -> None:
    """torchrun killed while its processes import: their parent is already another, and they must not train on."""
    code = "from finetune.training.distributed import die_with_launcher; die_with_launcher(); print('trains')"
    environ = os.environ | {"PYTHONPATH": str(root)}
    for launcher_pid, fate in ((os.getpid(), 0), (2**22 + 1, -signal.SIGKILL)):  # its parent; a launcher gone
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=environ | {"FINETUNE_LAUNCHER_PID": str(launcher_pid)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == fate and ("trains" in done.stdout) == (fate == 0), done.stderr[-2000:]


def test_two_machines_meet_at_a_rendezvous_and_train_as_one_in_passes_of_so_many_tokens(
    workspace: Path, single: Path
) -> None:
    # two launcher agents of one process each, as on two one-GPU machines, meeting at a c10d rendezvous on 127.0.0.1;
    # each runs its 4 conversations of a step in passes of at most 256 positions (`train.micro_batch_tokens`), as
    # many as its rows' lengths need, the gradients exchanged once, after the last: the single process's curve still
    nodes = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "PET_RDZV_ID": "two-machines"}
    machines = [workspace / "machine-a", workspace / "machine-b"]
    before = {run.info.run_id for run in runs(workspace)}
    trainings = [
        start_training(workspace, folder, devices=1, environ=nodes, micro_batch_tokens=256) for folder in machines
    ]
    for folder, training in zip(machines, trainings, strict=True):
        assert training.wait(timeout=600) == 0, (folder / "train.log").read_text()[-3000:]
    writers = [folder for folder in machines if (folder / "adapter").is_dir()]
    assert len(writers) == 1  # rank 0's machine writes, the other nothing
    other = next(folder for folder in machines if folder not in writers)
    assert not any((other / name).exists() for name in ("adapter", "train.json", "loss.csv", "eval_loss.csv"))
    assert losses(writers[0] / "loss.csv") == pytest.approx(losses(single / "loss.csv"), rel=1e-3)
    counts = [
        re.findall(r"forward passes: (\d+) for (\d+) micro-batches", (f / "train.log").read_text()) for f in machines
    ]
    assert counts[0] == counts[1] and int(counts[0][0][0]) > int(counts[0][0][1]) > 0, counts  # cut, alike on both
    new = [run for run in runs(workspace) if run.info.run_id not in before]
    assert [run.data.tags["world_size"] for run in new] == ["2"]  # one MLflow run for both machines
    assert new[0].data.tags["fit.micro_batch_tokens"] == "256"
    # with each machine's use of its GPUs, CPU and memory: rank 0's own, and the other's under its node number
    logged = set(new[0].data.metrics)
    assert {"system/cpu_utilization_percentage", "system/node1/cpu_utilization_percentage"} <= logged, logged


EVALUATE_OUTPUTS = ("evaluate.json", "samples.json", "bars.csv")


def start_evaluate(work: Path, adapter: Path, out: Path, devices: int) -> subprocess.Popen:
    """The evaluate stage's command as dvc.yaml runs it, on the adapter of a training in `work`."""
    settings = yaml.safe_load((work / "evaluate-params.yaml").read_text())
    settings["evaluate"]["devices"] = devices
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "stages.evaluate", "--params", str(out / "params.yaml")]
    command += ["--data", str(work / "tokenized"), "--texts", str(work / "standardized"), "--adapter", str(adapter)]
    command += ["--benchmarks", str(work / "benchmark_items")]
    command += [
        item
        for flag, name in zip(("--metrics", "--samples", "--bars"), EVALUATE_OUTPUTS, strict=True)
        for item in (flag, str(out / name))
    ]
    environ = os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    log = (out / "evaluate.log").open("w")
    return subprocess.Popen(command, cwd=out, env=environ, stdout=log, stderr=subprocess.STDOUT)


def test_two_processes_evaluate_as_one(workspace: Path, single: Path, root: Path) -> None:
    """evaluate's items shared out over two processes and gathered: the same metrics, answers and benchmark
    predictions as one process, exactly; rank 0 alone writes. Each item goes alone through the model (a batch
    padded otherwise moves the last bits of a greedy answer's logits, and can change a token)."""
    settings = yaml.safe_load((workspace / "params.yaml").read_text())
    demo = yaml.safe_load((root / "demo" / "params.yaml").read_text())
    sets = [{**entry, "dataset": str(root / entry["dataset"])} for entry in demo["benchmarks"]["sets"]]
    settings["benchmarks"] = demo["benchmarks"] | {"sets": sets, "max_new_tokens": 8}
    alone = {"batch_tokens": 1, "generate_batch_size": 1, "benchmark_batch_tokens": 1}
    settings["evaluate"] |= {"max_rows": 15, "num_samples": 5, "max_new_tokens": 8, **alone}
    (workspace / "evaluate-params.yaml").write_text(yaml.safe_dump(settings))
    items = workspace / "benchmark_items"
    if not items.exists():
        sources = (root / "data" / "benchmarks",)
        benchmarks.main(
            workspace / "evaluate-params.yaml", sources, workspace / "standardized", items, workspace / "b.json"
        )

    folders = {devices: workspace / f"evaluate-{devices}" for devices in (1, 2)}
    stages = {devices: start_evaluate(workspace, single / "adapter", out, devices) for devices, out in folders.items()}
    for devices, stage in stages.items():
        assert stage.wait(timeout=600) == 0, (folders[devices] / "evaluate.log").read_text()[-3000:]
    assert "evaluate.devices: 2 processes on this machine" in (folders[2] / "evaluate.log").read_text()
    one, two = (json.loads((folders[d] / "evaluate.json").read_text()) for d in (1, 2))
    assert one.keys() == two.keys()
    assert one["eval_rows"] == 15 and one["generated_samples"] == 5 and one["finqa_rows"] >= 2
    assert {**two, "evaluate_seconds": 0} == {**one, "evaluate_seconds": 0}
    # each held-out answer and numeric benchmark answer, item for item, in the items' order
    assert json.loads((folders[2] / "samples.json").read_text()) == json.loads(
        (folders[1] / "samples.json").read_text()
    )
    assert sorted(path.name for path in folders[2].iterdir()) == sorted(
        ["params.yaml", "evaluate.log", *EVALUATE_OUTPUTS]
    )
