"""Data-parallel training: how many processes train, how the stage starts them, and which of them writes.

`train.devices` decides the number of processes, one per GPU: `auto` takes every visible GPU (one process on a
machine without one), a number takes that many (on the CPU, processes that talk over gloo: what CI runs). With
more than one, the train stage starts again under PyTorch's own launcher, `torch.distributed.run` (torchrun), with
the same arguments; each process then finds its rank in the environment the launcher sets. The effective batch of
`params.yaml` (micro-batch x accumulation) is kept: each of N processes takes 1/N of the accumulation (or of the
micro-batch). Rank 0 alone opens the MLflow run and writes the adapter, metrics and plots. Several machines: the
same command on each, with torchrun's own variables (`PET_NNODES`, `PET_RDZV_ENDPOINT`) saying where they meet.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from finetune.config.params import require


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


def processes(devices: str | int, visible_gpus: int) -> int:
    """How many processes `train.devices` asks for on a machine with `visible_gpus` GPUs.

    `processes("auto", 2)` -> 2; `processes("auto", 0)` -> 1; `processes(1, 2)` -> 1; `processes(4, 2)` refused.
    """
    if devices == "auto":
        return max(visible_gpus, 1)
    require(
        isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1,
        f"train.devices must be auto or a number of processes >= 1, got {devices!r}",
    )
    require(
        visible_gpus == 0 or devices <= visible_gpus,
        f"train.devices is {devices} but this machine shows {visible_gpus} GPU(s) (CUDA_VISIBLE_DEVICES): "
        "set train.devices: auto or at most that many",
    )
    return devices


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


def launched(environ: dict[str, str]) -> bool:
    """Whether this process was started by torchrun (it sets `LOCAL_RANK` and `TORCHELASTIC_RUN_ID`)."""
    return "LOCAL_RANK" in environ and "TORCHELASTIC_RUN_ID" in environ


def per_process(per_device: int, accumulation: int, world_size: int) -> tuple[int, int]:
    """`(micro-batch, accumulation)` of each of `world_size` processes that keep the effective batch
    `per_device x accumulation`: the accumulation divided if it can be, else the micro-batch.

    `per_process(2, 4, 2)` -> `(2, 2)`; `per_process(8, 1, 2)` -> `(4, 1)`; `per_process(3, 1, 2)` refused.
    """
    if accumulation % world_size == 0:
        return per_device, accumulation // world_size
    require(
        per_device % world_size == 0,
        f"the effective batch train.per_device_train_batch_size x train.gradient_accumulation_steps = {per_device} x "
        f"{accumulation} cannot be split evenly over {world_size} processes: make either a multiple of {world_size}, "
        "or set train.devices to a divisor of one",
    )
    return per_device // world_size, accumulation


def restart_under_launcher(count: int, module: str, arguments: list[str]) -> None:
    """Replace this process with torchrun running `count` copies of `module` (DVC waits on the same process id,
    and a signal to it reaches the launcher, which stops every copy)."""
    command = launcher(count, module, arguments, dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
