"""Several processes, before any starts: how many (`train.devices`, `evaluate.devices`), the effective batch split
over them, torchrun's command line and each process's place, each process's share of evaluate's items."""

from __future__ import annotations

import sys

import pytest

from finetune.training.distributed import (
    World,
    gather_shards,
    launched,
    launcher,
    machine_count,
    per_process,
    processes,
    several_nodes,
    shard,
    splits,
    this_machine_only,
)
from finetune.training.leases import wanted


def test_devices_auto_takes_every_visible_gpu_and_one_process_without() -> None:
    assert processes("auto", 2) == 2 and processes("auto", 0) == 1
    assert processes(1, 2) == 1 and processes(2, 0) == 2  # on the CPU: gloo processes
    with pytest.raises(ValueError, match=r"train.devices is 4 but this machine shows 2 GPU"):
        processes(4, 2)
    for bad in ("two", 0, True, 1.5):
        with pytest.raises(ValueError, match="train.devices must be auto or a number of processes >= 1"):
            processes(bad, 2)


def test_the_effective_batch_is_kept_over_the_processes() -> None:
    assert per_process(2, 4, 2) == (2, 2)  # 2 x 4 = 2 x 2 x 2
    assert per_process(8, 1, 2) == (4, 1)
    assert per_process(4, 1, 1) == (4, 1)
    assert per_process(2, 4, 8) == (1, 1)  # 8 GPUs: the accumulation and the micro-batch both split
    assert per_process(4, 6, 8) == (1, 3) and per_process(2, 6, 4) == (1, 3)
    with pytest.raises(ValueError, match=r"= 3 x 1 cannot be split evenly over 2 processes"):
        per_process(3, 1, 2)
    with pytest.raises(ValueError, match=r"= 2 x 4 cannot be split evenly over 3 processes"):
        per_process(2, 4, 3)
    for per_device, accumulation in ((2, 4), (3, 1), (4, 6), (1, 8)):  # splits says what per_process makes
        for count in range(1, 13):
            kept = splits(per_device, accumulation)(count)
            if kept:
                micro, steps = per_process(per_device, accumulation, count)
                assert micro * steps * count == per_device * accumulation
            else:
                with pytest.raises(ValueError):
                    per_process(per_device, accumulation, count)


def test_the_launcher_is_torchrun_on_a_local_rendezvous_without_restarts() -> None:
    command = launcher(2, "stages.train", ["--data", "d"], {})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--max-restarts=0"} <= set(
        command
    )
    assert command[-4:] == ["-m", "stages.train", "--data", "d"]
    # several machines: torchrun's own variables replace the local defaults
    nodes = {"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "10.0.0.1:29400"}
    assert not any(flag.startswith("--rdzv-endpoint") for flag in launcher(1, "stages.train", [], nodes))
    assert several_nodes(nodes) and several_nodes({"PET_NNODES": "1:4"}) and not several_nodes({"PET_NNODES": "1"})
    with pytest.raises(ValueError, match="PET_NNODES=2 needs PET_RDZV_ENDPOINT"):
        launcher(1, "stages.train", [], {"PET_NNODES": "2"})
    # the batch splits over every machine's processes: 2 x 4 on two machines of 8 GPUs is 4 GPUs each
    assert machine_count(nodes) == 2 and machine_count({"PET_NNODES": "1:4"}) == machine_count({}) == 1
    assert wanted("auto", 8, 0, lambda count: splits(2, 4)(count * machine_count(nodes))) == 4
    # evaluate, which the other machines never run, drops torchrun's variables: its processes are this machine's
    environ = nodes | {"PET_RDZV_ID": "finance-1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert this_machine_only(environ) == ["PET_NNODES", "PET_RDZV_ENDPOINT", "PET_RDZV_ID"]
    assert environ == {"CUDA_VISIBLE_DEVICES": "0,1"} and not several_nodes(environ)
    assert "--rdzv-endpoint=localhost:0" in launcher(2, "stages.evaluate", [], environ)
    assert World.from_environ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == World(1, 1, 2)
    assert World.from_environ({}).main and not World(1, 1, 2).main
    assert launched({"LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}) and not launched({"LOCAL_RANK": "0"})


def test_every_item_is_in_one_share_and_one_process_keeps_them_all() -> None:
    items = list(range(7))
    shares = [shard(items, World(rank, rank, 3)) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(item for share in shares for item in share) == items
    assert shard(items, World()) == gather_shards(items, World()) == items
