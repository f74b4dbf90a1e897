"""GPU leases with fake GPU ids: no GPU held twice, waits that resolve, a killed holder's GPUs freed; the share of a
sweep's worker; a path that a DVC experiment's copy lacks, named with the fix."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config.workspace import experiment_copy, require_in_copy
from finetune.training.distributed import splits
from finetune.training.leases import (
    FOLDER,
    gpu_ids,
    lease_folder,
    lease_gpus,
    lock_file,
    running_workers,
    sweep_workers,
    take,
    try_take,
    wanted,
)

GONE = 2**31 - 1  # a process id above any pid_max: no such process


def test_the_ids_are_cuda_visible_devices_entries_else_the_first_indices() -> None:
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "2, 3"}, 2) == ["2", "3"]
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-8f2c,GPU-11aa"}, 2) == ["GPU-8f2c", "GPU-11aa"]
    assert gpu_ids({}, 3) == ["0", "1", "2"] and gpu_ids({}, 0) == []
    assert lock_file(Path("/l"), "MIG-1/2") == Path("/l/gpu-MIG-1_2.lock")


def test_auto_in_a_sweep_is_a_fair_share_and_at_least_one_gpu() -> None:
    assert wanted("auto", 8, 0) == 8 and wanted("auto", 8, 1) == 8  # outside a sweep, or one worker: every GPU
    assert wanted("auto", 8, 4) == 2 and wanted("auto", 8, 3) == 2
    assert wanted("auto", 2, 4) == 1  # more workers than GPUs: one each, the others wait
    assert wanted(1, 8, 4) == 1 and wanted(3, 8, 0) == 3  # a number as written
    assert wanted("auto", 0, 4) == 0 and wanted(2, 0, 0) == 0  # no GPU: nothing to lease (gloo processes)


def test_auto_takes_the_most_gpus_the_effective_batch_splits_over() -> None:
    """The seed's 2 x 4 on 3, 6 or 7 GPUs: auto used to lease them all, and train then refused the split."""
    eight = splits(2, 4)
    assert [wanted("auto", visible, 0, eight) for visible in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
    assert wanted("auto", 8, 3, eight) == 2  # a sweep's share of 2 (8 GPUs, 3 workers)
    assert wanted(3, 8, 0, eight) == 3  # a number as written: train names the split it cannot make


def test_the_running_workers_are_dvcs_live_queue_workers(tmp_path: Path) -> None:
    folder = tmp_path / ".dvc/tmp/exps/celery"
    folder.mkdir(parents=True)
    for name, pid, returncode in (("1", os.getpid(), None), ("2", os.getpid(), None), ("3", os.getpid(), 0)):
        (folder / f"dvc-exp-worker-{name}.json").write_text(json.dumps({"pid": pid, "returncode": returncode}))
    (folder / "dvc-exp-worker-4.json").write_text(json.dumps({"pid": GONE, "returncode": None}))  # died unrecorded
    (folder / "dvc-exp-worker-5.json").write_text('{"pid": 1')  # DVC writing it
    assert running_workers(tmp_path) == 2
    copy = tmp_path / ".dvc/tmp/exps/tmpab12"
    copy.mkdir()
    assert sweep_workers({"DVC_ROOT": str(tmp_path)}, copy) == 2
    assert sweep_workers({"DVC_ROOT": str(tmp_path)}, tmp_path) == 0  # dvc repro in the workspace: no sweep
    assert sweep_workers({}, copy) == 0


def test_a_lease_is_all_of_its_gpus_or_none_and_names_its_holder(tmp_path: Path) -> None:
    lease = take(["0", "1", "2"], 2, tmp_path, "rank-8: train (pid 1)")
    assert lease.ids == ("0", "1") and lease.visible == "0,1"
    assert lock_file(tmp_path, "1").read_text() == "rank-8: train (pid 1)\n"
    assert try_take(["0", "1", "2"], 2, tmp_path) == ({}, ["0", "1"])  # one free of the two asked: nothing taken
    taken, _ = try_take(["0", "1", "2"], 1, tmp_path)
    assert list(taken) == ["2"]
    for fd in taken.values():
        os.close(fd)
    lease.release()
    again = take(["0", "1", "2"], 3, tmp_path, "rank-16: train (pid 2)")
    assert again.ids == ("0", "1", "2")
    again.release()
    with pytest.raises(ValueError, match=r"3 GPU\(s\) asked for, but this machine shows 2"):
        take(["0", "1"], 3, tmp_path, "x")


def test_a_stage_leases_in_the_real_repository_names_its_experiment_and_sees_only_its_gpus(tmp_path: Path) -> None:
    repo, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmpab12"  # a queued experiment's copy
    environ = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c", "DVC_ROOT": str(repo), "DVC_EXP_NAME": "rapt-olms"}
    lease = lease_gpus(2, 3, environ, copy, "train")
    assert lease.ids == ("GPU-a", "GPU-b") and environ["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    text = lock_file(lease_folder(repo), "GPU-a").read_text()  # the real repository's folder, not the copy's
    assert lease_folder(repo) == repo / FOLDER  # one machine's: shared by every process on it
    assert re.fullmatch(rf"rapt-olms: train \(pid {os.getpid()}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)\n", text)
    assert not (copy / FOLDER).exists()
    # a second stage of another experiment gets the GPU left, by its id
    other = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c", "DVC_ROOT": str(repo), "DVC_EXP_NAME": "other"}
    second = lease_gpus(1, 3, other, copy, "evaluate")
    assert second.ids == ("GPU-c",) and other["CUDA_VISIBLE_DEVICES"] == "GPU-c"
    lease.release()
    second.release()
    # `dvc repro` in the workspace: the folder under it, the holder named so; no GPU: nothing leased or changed
    environ = {}
    lease = lease_gpus(1, 2, environ, repo, "evaluate")
    assert lease.ids == ("0",) and environ == {"CUDA_VISIBLE_DEVICES": "0"}
    assert lock_file(lease_folder(repo), "0").read_text().startswith(f"dvc repro: evaluate (pid {os.getpid()}, since ")
    lease.release()
    environ = {}
    assert lease_gpus(0, 0, environ, repo, "train").ids == () and environ == {}
    # several machines training together from one clone they mount: the other machine holding its GPU 0 (as one
    # folder for both used to say: this machine's too) leaves this machine's GPU 0 free
    (repo / FOLDER / "other-host").mkdir()
    with open(lock_file(repo / FOLDER / "other-host", "0"), "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        here = lease_gpus(1, 1, {}, repo, "train", machines=True)
        assert here.ids == ("0",)
        assert lock_file(repo / FOLDER / socket.gethostname(), "0").read_text().startswith("dvc repro: train (pid ")
        here.release()


def test_a_path_the_experiments_copy_lacks_is_named_with_the_fix(tmp_path: Path) -> None:
    copy = tmp_path / ".dvc/tmp/exps/tmpab12"
    (copy / "models").mkdir(parents=True)
    (tmp_path / "models/tiny").mkdir(parents=True)
    (tmp_path / "data/source").mkdir(parents=True)
    (tmp_path / "data/source/rows.jsonl").write_text("{}\n")
    environ = {"DVC_ROOT": str(tmp_path)}
    assert experiment_copy(environ, copy) == tmp_path.resolve() and experiment_copy(environ, tmp_path) is None
    with pytest.raises(FileNotFoundError) as error:
        require_in_copy("models/tiny", "model.model_name", environ, copy)
    assert str(error.value).startswith(f"model.model_name: models/tiny is in the workspace ({tmp_path}/models/tiny)")
    assert "`-C models/tiny`" in str(error.value) and "dvc add models/tiny" in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"^fetch.dataset: data/source/rows.jsonl is in the workspace"):
        require_in_copy("data/source/rows.jsonl", "fetch.dataset", environ, copy)
    (copy / "models/tiny").mkdir()  # copied with -C
    require_in_copy("models/tiny", "model.model_name", environ, copy)
    require_in_copy("unsloth/DeepSeek-R1-Distill-Llama-8B", "model.model_name", environ, copy)  # a Hub id
    require_in_copy("models/tiny", "model.model_name", environ, tmp_path / "elsewhere")  # not in a copy


# a worker: `rounds` times, lease `count` of the GPUs `ids`, hold them a moment, give them back. Each GPU it holds
# gets a marker file made with O_EXCL, which fails if another worker holds that GPU too.
WORKER = """
import logging, os, sys, time
from pathlib import Path
from finetune.training.leases import take
logging.basicConfig(level=logging.INFO, format="%(message)s")
folder, ids, count, rounds, name = Path(sys.argv[1]), sys.argv[2].split(","), *map(int, sys.argv[3:5]), sys.argv[5]
Path(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
for turn in range(rounds):
    lease = take(ids, count, folder / "leases", f"{name} turn {turn} (pid {os.getpid()})", poll=0.02)
    for gpu in lease.ids:
        os.close(os.open(folder / f"in-use-{gpu}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    time.sleep(float(sys.argv[6]))
    for gpu in lease.ids:
        os.remove(folder / f"in-use-{gpu}")
    lease.release()
    print("done", turn, flush=True)
"""


def worker(root: Path, folder: Path, count: int, rounds: int, name: str, hold: float) -> subprocess.Popen:
    command = [sys.executable, "-c", WORKER, str(folder), "a,b", str(count), str(rounds), name, str(hold)]
    environ = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # subprocesses
def test_workers_on_fake_gpus_never_hold_one_twice_and_every_wait_resolves(root: Path, tmp_path: Path) -> None:
    # five workers, two GPUs: four lease one GPU at a time, one both at once, all starting together
    workers = [worker(root, tmp_path, 1, 3, f"one-{i}", 0.3) for i in range(4)]
    workers.append(worker(root, tmp_path, 2, 2, "both", 0.3))
    while len(list(tmp_path.glob("ready-*"))) < len(workers):
        assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
    (tmp_path / "go").touch()
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0] * 5, outputs  # a GPU held twice: FileExistsError
    assert [out.split() for out, _ in outputs] == [["done", "0", "done", "1", "done", "2"]] * 4 + [
        ["done", "0", "done", "1"]
    ]
    waits = [line for _, err in outputs for line in err.splitlines() if line.startswith("waiting for")]
    assert waits, "no worker waited: the test did not contend"  # five workers on two GPUs must take turns
    assert all(" held by one-" in line or " held by both " in line for line in waits), waits


@pytest.mark.slow  # subprocesses
def test_a_killed_holder_frees_its_gpus_for_the_one_waiting(root: Path, tmp_path: Path) -> None:
    holder = worker(root, tmp_path, 2, 1, "holder", 3600)  # both GPUs, for an hour
    try:
        (tmp_path / "go").touch()
        while len(list(tmp_path.glob("in-use-*"))) < 2:
            assert holder.poll() is None, holder.communicate()
        waiter = worker(root, tmp_path, 1, 1, "waiter", 0)
        first = waiter.stderr.readline()  # it waits, and says for what
        assert first.startswith("waiting for 1 free GPU(s) of 2 (GPU a held by holder turn 0 (pid "), first
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to give anything back: the kernel drops its locks
        holder.wait()
    for marker in tmp_path.glob("in-use-*"):  # the holder's bookkeeping, which it had no chance to undo
        marker.unlink()
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0 and out.split() == ["done", "0"], err
    assert err.startswith("leased GPU(s) a after waiting"), err
