"""Data-parallel train and evaluate: how many processes run, how the stage starts them, which of them writes.

`train.devices` (`evaluate.devices`) decides the number of processes, one per GPU: `auto` takes every visible GPU
(one process on a machine without one; for train, the most GPUs the effective batch splits over), a number takes
that many (on the CPU, processes that talk over gloo: what CI runs). The stage leases its GPUs (`leases`), and with
more than one starts again under PyTorch's own launcher, `torch.distributed.run` (torchrun), with the same
arguments; each process then finds its rank in the environment the launcher sets (`start_processes`), and dies with
torchrun (`die_with_launcher`). Training keeps the effective batch of `params.yaml` (micro-batch x accumulation): N
processes divide the accumulation as far as it goes and the micro-batch for the rest (`per_process`). Evaluation
gives each process every N-th item to score (`shard`) and puts their results back in order (`gather_shards`). Rank 0
alone writes: the MLflow run, the adapter, metrics and plots. Several machines (train only): the same command on
each, with torchrun's own variables (`PET_NNODES`, `PET_RDZV_ENDPOINT`) saying where they meet.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from finetune.config.params import load, require
from finetune.config.workspace import require_in_copy
from finetune.model.load import ModelConfig
from finetune.training import leases

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine: the GPU it uses
    size: int = 1  # processes in all

    @property
    def main(self) -> bool:
        """Whether this process writes: the adapter, metrics, plots, the MLflow run."""
        return self.rank == 0

    @property
    def gpu(self) -> int | None:
        """The GPU this process loads the model onto, one of several; None alone (the loader's own placement)."""
        return self.local_rank if self.size > 1 else None

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> World:
        """The world the launcher describes in `RANK`, `LOCAL_RANK` and `WORLD_SIZE`; one process without them."""
        return cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)), int(environ.get("WORLD_SIZE", 1)))


def processes(devices: str | int, visible_gpus: int, key: str = "train.devices") -> int:
    """How many processes `devices` (the setting `key`) asks for on a machine with `visible_gpus` GPUs.

    `processes("auto", 2)` -> 2; `processes("auto", 0)` -> 1; `processes(1, 2)` -> 1; `processes(4, 2)` refused.
    """
    if devices == "auto":
        return max(visible_gpus, 1)
    require(
        isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1,
        f"{key} must be auto or a number of processes >= 1, got {devices!r}",
    )
    require(
        visible_gpus == 0 or devices <= visible_gpus,
        f"{key} is {devices} but this machine shows {visible_gpus} GPU(s) (CUDA_VISIBLE_DEVICES): "
        f"set {key}: auto or at most that many",
    )
    return devices


PR_SET_PDEATHSIG = 1  # prctl's option: the signal this process gets when its parent dies (linux/prctl.h)
LAUNCHER_PID = "FINETUNE_LAUNCHER_PID"  # torchrun's process id, which its processes check their parent against
# torchrun's own `PET_*` environment variables, where set, win over these defaults
LAUNCH_DEFAULTS = {
    "PET_RDZV_BACKEND": "--rdzv-backend=c10d",
    "PET_RDZV_ENDPOINT": "--rdzv-endpoint=localhost:0",  # a free port of this machine: one node
    "PET_MAX_RESTARTS": "--max-restarts=0",  # a failed process ends them all, and the stage
}


def launcher(count: int, module: str, arguments: list[str], environ: dict[str, str]) -> list[str]:
    """The command that runs `python -m module arguments` as `count` processes on this machine under torchrun.

    One machine by default: a c10d rendezvous on a free port of 127.0.0.1, no restarts. Several when torchrun's own
    variables say so, the same on every machine: `PET_NNODES=2 PET_RDZV_ENDPOINT=<first machine>:29400 dvc repro`.
    """
    require(
        not several_nodes(environ) or "PET_RDZV_ENDPOINT" in environ,
        f"PET_NNODES={environ.get('PET_NNODES')} needs PET_RDZV_ENDPOINT=<host>:<port>, where the machines meet",
    )
    defaults = [flag for variable, flag in LAUNCH_DEFAULTS.items() if variable not in environ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={count}",
        *defaults,
        "-m",
        module,
        *arguments,
    ]


def several_nodes(environ: dict[str, str]) -> bool:
    """Whether torchrun is told to meet other machines: `PET_NNODES` above 1 (`2`, or a range like `1:4`)."""
    return environ.get("PET_NNODES", "1").split(":")[-1].strip() not in ("", "1")


def machine_count(environ: dict[str, str]) -> int:
    """How many machines train together where `PET_NNODES` says so (`2`); 1 otherwise, or for a range (`1:4`), whose
    count is torchrun's to find: `machine_count({"PET_NNODES": "2"})` -> 2."""
    nodes = environ.get("PET_NNODES", "1").strip()
    return int(nodes) if nodes.isdigit() and int(nodes) >= 1 else 1


def this_machine_only(environ: MutableMapping[str, str]) -> list[str]:
    """Drop torchrun's `PET_*` variables from `environ`, which then starts processes on this machine alone; the names
    dropped. evaluate so: the other machines of a training run its command only, and would never join."""
    dropped = sorted(name for name in environ if name.startswith("PET_"))
    for name in dropped:
        del environ[name]
    return dropped


def launched(environ: dict[str, str]) -> bool:
    """Whether this process was started by torchrun (it sets `LOCAL_RANK` and `TORCHELASTIC_RUN_ID`)."""
    return "LOCAL_RANK" in environ and "TORCHELASTIC_RUN_ID" in environ


def per_process(per_device: int, accumulation: int, world_size: int) -> tuple[int, int]:
    """`(micro-batch, accumulation)` of each of `world_size` processes that keep the effective batch
    `per_device x accumulation`: the accumulation divided as far as it goes, the rest of the split from the
    micro-batch (which memory bounds: it shrinks only when it must).

    `per_process(2, 4, 2)` -> `(2, 2)`; `per_process(8, 1, 2)` -> `(4, 1)`; `per_process(2, 4, 8)` -> `(1, 1)`;
    `per_process(4, 6, 8)` -> `(1, 3)`; `per_process(3, 1, 2)` refused.
    """
    shared = math.gcd(accumulation, world_size)  # the factor the accumulation takes; the micro-batch takes the rest
    require(
        splits(per_device, accumulation)(world_size),
        f"the effective batch train.per_device_train_batch_size x train.gradient_accumulation_steps = {per_device} x "
        f"{accumulation} cannot be split evenly over {world_size} processes: make it a multiple of {world_size}, "
        "or set train.devices to a divisor of it",
    )
    return per_device // (world_size // shared), accumulation // shared


def splits(per_device: int, accumulation: int) -> Callable[[int], bool]:
    """Whether the effective batch `per_device x accumulation` splits evenly over a number of processes
    (`per_process`): `splits(2, 4)(8)` -> True, `splits(2, 4)(3)` -> False."""
    return lambda count: per_device % (count // math.gcd(accumulation, count)) == 0


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this process, one torchrun started, when torchrun dies. torchrun holds the stage's GPU
    lease and starts its processes in sessions of their own: killed outright (SIGKILL, the out-of-memory killer) it
    freed the GPUs while they trained on, for the next experiment to take. Linux only (`prctl`)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(LAUNCHER_PID, str(os.getppid())):  # torchrun died before the request
        os.kill(os.getpid(), signal.SIGKILL)


def restart_under_launcher(count: int, module: str, arguments: list[str]) -> None:
    """Replace this process with torchrun running `count` copies of `module` (DVC waits on the same process id,
    and a signal to it reaches the launcher, which stops every copy)."""
    command = launcher(count, module, arguments, dict(os.environ))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # torchrun's, after the exec: its processes' parent
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def start_processes(
    stage: str,
    params: Path,
    devices: str | int,
    fits: Callable[[int], bool] = bool,  # bool: any count >= 1
    machines: bool = False,
) -> None:
    """Before anything starts CUDA: check that a local `model.model_name` of `params` is in a DVC experiment's copy
    (before any wait, `workspace.require_in_copy`), lease the GPUs that `devices` (the setting `<stage>.devices`) asks
    for and make them this process's `CUDA_VISIBLE_DEVICES` (experiments that DVC's queue workers run at once take
    turns or share out the machine's GPUs, `leases`); then, for more than one, or other machines to meet, start
    `stages.<stage>` again as that many processes under torchrun, which inherits the lease. `auto` takes the most
    GPUs, up to what it may take, that `fits` (train's batch splits evenly over them: `splits`). Other machines are
    met where `machines` (train) and torchrun's variables say so; otherwise those are dropped (`this_machine_only`).
    Nothing to do in a process torchrun started."""
    if launched(dict(os.environ)):
        die_with_launcher()
        return
    key = f"{stage}.devices"
    if not machines and several_nodes(dict(os.environ)):
        log.info("%s runs on this machine alone, without %s", stage, ", ".join(this_machine_only(os.environ)))
    require_in_copy(load(ModelConfig, params, "model").model_name, "model.model_name", os.environ, Path.cwd())
    visible, workers = leases.visible_gpus(), leases.sweep_workers(os.environ, Path.cwd())
    count = processes(devices, visible, key)  # a number of GPUs the machine lacks is refused here
    if workers:
        log.info("an experiment of a sweep: %d queue workers running, %d GPU(s) visible", workers, visible)
    machines_met, nodes = several_nodes(dict(os.environ)), machine_count(dict(os.environ))
    want = leases.wanted(devices, visible, workers, lambda count: fits(count * nodes))  # the batch splits over all
    if want < leases.wanted(devices, visible, workers):
        log.info("%s: auto takes %d GPU(s), the most that train's effective batch splits evenly over", key, want)
    lease = leases.lease_gpus(want, visible, os.environ, Path.cwd(), stage, machines_met)
    count = len(lease.ids) or count
    if count > 1 or machines_met:
        log.info("%s: %d processes on this machine, started by torch.distributed.run", key, count)
        restart_under_launcher(count, f"stages.{stage}", sys.argv[1:])


@contextlib.contextmanager
def process_group(world: World) -> Iterator[None]:
    """The processes of `world` joined for `gather_shards` (NCCL between GPUs, gloo on the CPU); nothing alone."""
    if world.size == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(items: list[T], world: World) -> list[T]:
    """This process's share of `items`: every `world.size`-th, from its rank on (long and short items alike in each
    share). `shard([0, 1, 2, 3, 4], World(1, 1, 2))` -> `[1, 3]`."""
    return items[world.rank :: world.size]


def gather_shards(mine: list[T], world: World) -> list[T]:
    """The results of every process's `shard`, in every process, back in the items' order (`mine`: this one's)."""
    if world.size == 1:
        return mine
    import torch.distributed as dist

    shares: list[Any] = [None] * world.size
    dist.all_gather_object(shares, mine)
    out: list[Any] = [None] * sum(len(share) for share in shares)
    for rank, share in enumerate(shares):
        out[rank :: world.size] = share
    return out
