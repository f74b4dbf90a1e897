"""GPU leases: train and evaluate take their GPUs by a lock per GPU, so that the experiments DVC's queue workers run
at once on one machine (`dvc queue start -j N`) never share a GPU.

    <repo root>/.dvc/tmp/gpu-leases/gpu-<id>.lock   one per GPU, by its id in CUDA_VISIBLE_DEVICES (else 0..n-1);
                                                    its text names the holder
    <repo root>/.dvc/tmp/gpu-leases/leases.lock     held for a moment while a stage takes its GPUs
    <repo root>/.dvc/tmp/gpu-leases/<host>/...      the same, where several machines train together from one clone

The repo root is DVC's `DVC_ROOT`: the real repository, also from an experiment's temporary copy. A lease is an
`fcntl.flock` of the GPUs' files, which the kernel drops when the process that holds it ends, killed or not: no
file is left to clean up. A stage takes all of its GPUs at once or none, so two stages that each hold one of two
GPUs never wait on each other, and while too few are free it waits, logging for what and who holds them. It then
sets `CUDA_VISIBLE_DEVICES` to its GPUs before anything starts CUDA; torchrun, which the stage's process becomes,
holds the lease, its processes inherit `CUDA_VISIBLE_DEVICES` and die with it (`distributed.die_with_launcher`).

How many: `train.devices` as a number; `auto` every visible GPU, or in an experiment of a sweep (DVC's queue
workers running) a fair share: visible GPUs / running workers, at least one; for train the most of those that the
effective batch splits over; `evaluate.devices` the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from finetune.config.params import require
from finetune.config.workspace import experiment_copy

log = logging.getLogger(__name__)

FOLDER = Path(".dvc", "tmp", "gpu-leases")  # under the repo root; .dvc/tmp is DVC's own, ignored by git


def lease_folder(root: Path, machines: bool = False) -> Path:
    """The lock files of this machine's GPUs; in a folder of its host name where several machines train together
    (`machines`) from a clone they all mount, so that each machine's GPU 0 is its own. Otherwise the folder itself,
    which every process on this machine shares (containers of other host names on the same GPUs included)."""
    return root / FOLDER / socket.gethostname() if machines else root / FOLDER


WORKERS = Path(".dvc", "tmp", "exps", "celery")  # DVC's queue workers' files: dvc-exp-worker-<n>.json
POLL_SECONDS = 2.0  # between two looks at the GPUs, while waiting
LOG_SECONDS = 300.0  # between two log lines of a stage that keeps waiting


@dataclass
class Lease:
    """GPUs held by this process (and, through `exec`, by torchrun): `ids`, as their locks' open files `fds`. The
    files stay open, and the GPUs leased, until `release` or the end of the process (there is no finalizer)."""

    ids: tuple[str, ...]
    fds: tuple[int, ...] = ()

    @property
    def visible(self) -> str:
        """The lease as `CUDA_VISIBLE_DEVICES`: `Lease(("1", "3")).visible` -> `'1,3'`."""
        return ",".join(self.ids)

    def release(self) -> None:
        """Give the GPUs back (the end of the process does so too)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """An exclusive lock of the file `path` (created if missing) while the block runs, waiting for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def gpu_ids(environ: Mapping[str, str], count: int) -> list[str]:
    """The ids of the `count` GPUs this process sees: `CUDA_VISIBLE_DEVICES`' entries where it is set (indices or
    UUIDs), else 0 to count - 1.

    `gpu_ids({"CUDA_VISIBLE_DEVICES": "2, 3"}, 2)` -> `['2', '3']`; `gpu_ids({}, 2)` -> `['0', '1']`.
    """
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [entry.strip() for entry in environ["CUDA_VISIBLE_DEVICES"].split(",") if entry.strip()][:count]
    return [str(index) for index in range(count)]


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_workers(root: Path) -> int:
    """DVC's queue workers running for the repository at `root` (`dvc queue start -j N` starts N): the process
    files DVC keeps of them whose process has not ended (no return code yet, and alive)."""
    count = 0
    for path in (root / WORKERS).glob("dvc-exp-worker-*.json"):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # DVC is rewriting it: that worker is starting or ending
            continue
        count += info.get("returncode") is None and alive(int(info["pid"]))
    return count


def sweep_workers(environ: Mapping[str, str], cwd: Path) -> int:
    """The queue workers running the sweep this stage is an experiment of; 0 outside a DVC experiment's copy."""
    root = experiment_copy(environ, cwd)
    return 0 if root is None else running_workers(root)


def visible_gpus() -> int:
    """The CUDA GPUs this process may use (`CUDA_VISIBLE_DEVICES` applied); 0 without CUDA. Counted through NVML,
    without starting CUDA (as `torch.cuda.is_available` would), so that `CUDA_VISIBLE_DEVICES` can still be narrowed
    to the leased GPUs."""
    import torch

    return torch.cuda.device_count()


def wanted(devices: str | int, visible: int, workers: int, fits: Callable[[int], bool] = bool) -> int:
    """How many of the `visible` GPUs a stage leases for `devices` (`train.devices`: `auto` or a number, at most
    `visible`) with `workers` queue workers running its sweep (0 outside one); `auto` takes the most, up to its
    share, that `fits` (train's effective batch splits evenly over them; `bool`: any number).

    `wanted("auto", 8, 0)` -> 8; `wanted("auto", 8, 4)` -> 2; `wanted("auto", 2, 4)` -> 1; `wanted(1, 8, 4)` -> 1;
    `wanted("auto", 3, 0, lambda n: 8 % n == 0)` -> 2; `wanted("auto", 0, 4)` -> 0 (no GPU: nothing to lease).
    """
    if visible == 0:
        return 0
    if devices == "auto":
        share = max(visible // workers, 1) if workers > 1 else visible
        return next(count for count in range(share, 0, -1) if count == 1 or fits(count))
    return int(devices)


def lock_file(folder: Path, gpu: str) -> Path:
    """The file whose lock is GPU `gpu`'s lease: `gpu-0.lock`, `gpu-GPU-8f2c....lock` for a UUID."""
    return folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def holder_of(folder: Path, gpu: str) -> str:
    """Who holds GPU `gpu`, as its lock file says."""
    with contextlib.suppress(OSError):
        return lock_file(folder, gpu).read_text(encoding="utf-8").strip() or "a process starting"
    return "a process starting"


def try_take(ids: list[str], count: int, folder: Path) -> tuple[dict[str, int], list[str]]:
    """`({gpu: fd}, busy)`: `count` free GPUs of `ids`, locked, or none (nothing locked) where fewer are free; and
    the GPUs found held by another process."""
    taken: dict[str, int] = {}
    busy = []
    for gpu in ids:
        if len(taken) == count:
            break
        fd = os.open(lock_file(folder, gpu), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy.append(gpu)
            continue
        taken[gpu] = fd
    if len(taken) < count:
        for fd in taken.values():
            os.close(fd)
        return {}, busy
    return taken, busy


def take(
    ids: list[str], count: int, folder: Path, holder: str, poll: float = POLL_SECONDS, say: float = LOG_SECONDS
) -> Lease:
    """A lease of `count` of the GPUs `ids` (lock files in `folder`), all at once, waiting while fewer are free and
    logging then (every `say` seconds) what it waits for and who holds the others. `holder` names this process in
    the files of the GPUs it holds. The locks' files stay open through `exec` (torchrun's restart)."""
    require(count <= len(ids), f"{count} GPU(s) asked for, but this machine shows {len(ids)}: {ids}")
    if count == 0:
        return Lease(())
    folder.mkdir(parents=True, exist_ok=True)
    start, said = time.monotonic(), None
    while True:
        with held(folder / "leases.lock"):
            taken, busy = try_take(ids, count, folder)
            for fd in taken.values():
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{holder}\n".encode(), 0)
                os.set_inheritable(fd, True)
        if taken:
            if said is not None:
                log.info("leased GPU(s) %s after waiting %.0f s", ",".join(taken), time.monotonic() - start)
            return Lease(tuple(taken), tuple(taken.values()))
        if said is None or time.monotonic() - said >= say:
            holders = "; ".join(f"GPU {gpu} held by {holder_of(folder, gpu)}" for gpu in busy)
            log.info("waiting for %d free GPU(s) of %d (%s)", count, len(ids), holders)
            said = time.monotonic()
        time.sleep(poll)


def lease_gpus(
    count: int, visible: int, environ: MutableMapping[str, str], cwd: Path, stage: str, machines: bool = False
) -> Lease:
    """`count` of this machine's `visible` GPUs for `stage`, leased in the repo root's folder (`lease_folder`, of
    this machine's host name where several `machines` train together; `take`, the holder named after the DVC
    experiment, or `dvc repro`), and made `environ`'s `CUDA_VISIBLE_DEVICES`."""
    root = Path(environ.get("DVC_ROOT") or cwd)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    holder = f"{environ.get('DVC_EXP_NAME') or 'dvc repro'}: {stage} (pid {os.getpid()}, since {since})"
    lease = take(gpu_ids(environ, visible), count, lease_folder(root, machines), holder)
    if lease.ids:
        environ["CUDA_VISIBLE_DEVICES"] = lease.visible
        log.info("%s: leased GPU(s) %s", stage, lease.visible)
    return lease
