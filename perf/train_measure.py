"""What `perf.train_speed` trains with and measures in each run: the settings (params.yaml's sections, the shape's
folder as the model, the script's batch and steps), the step clock, the GPU memory it took, the LoRA the model
carries, and the profile of a few steps."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from finetune.config.params import load
from finetune.model.load import ModelConfig
from finetune.tokens.chat import ChatConfig
from finetune.tokens.encode import TokenizeConfig
from finetune.training.config import LoraConfig, TrainConfig


@dataclass(frozen=True)
class Configs:
    """One run's settings, as a setup starts from them (each setup may override a few: `train_speed.SETUPS`)."""

    model: ModelConfig  # params' `model`, its model_name the shape's folder
    lora: LoraConfig  # params' `lora`
    train: TrainConfig  # params' `train`, with the script's batch (one pass) and steps, a log each step, no saves
    chat: ChatConfig  # params' `chat`: how the conversations become text
    tokenize: TokenizeConfig  # params' `tokenize`: answer-only labels, cut or drop


def configs(params_path: Path, model_dir: Path, batch: int, steps: int) -> Configs:
    """The sections of `params_path` that the train stage reads, set for a timed run of `steps` steps of `batch`
    conversations each on the model in `model_dir`."""
    model = dataclasses.replace(load(ModelConfig, params_path, "model"), model_name=str(model_dir), revision=None)
    train = dataclasses.replace(
        load(TrainConfig, params_path, "train"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        logging_steps=1,  # a loss per step: the processes' curves are compared step by step
        eval_steps=None,
        save_steps=None,
        devices=1,  # `--processes` sets the number of processes
    )
    return Configs(
        model=model,
        lora=load(LoraConfig, params_path, "lora"),
        train=train,
        chat=load(ChatConfig, params_path, "chat"),
        tokenize=load(TokenizeConfig, params_path, "tokenize"),
    )


def lora_ran(model: Any) -> dict[str, Any]:
    """The LoRA settings of a peft model as it carries them (rank, alpha, dropout, targets, rsLoRA)."""
    config = model.peft_config["default"]
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
        "rslora": bool(config.use_rslora),
    }


class StepClock:
    """Per-step wall times (device synchronised) and the tokens of the batches each step trained on."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []  # (real tokens, positions incl. padding) per optimizer step
        self.step_ends: list[float] = []
        self.pending: tuple[Any, int] = (0, 0)  # of the micro-batches trained on since the last step ended

    def count(self, batch: dict[str, Any]) -> None:
        """Add `batch`'s tokens to the step under way; a mask on the GPU is summed there and read at the step's end,
        which waits for the GPU anyway (an `int` here would stop the host until the GPU caught up)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = mask.sum() if mask is not None else ids.numel()
        self.pending = (self.pending[0] + real, self.pending[1] + int(ids.numel()))

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.steps.append((int(self.pending[0]), self.pending[1]))
        self.pending = (0, 0)

    def summary(self, warmup: int) -> dict[str, float]:
        """Effective tokens/s and padding share over the steps after the first `warmup`, and the slowest and median
        of those steps' seconds (a stall shows as one step far over the median)."""
        assert len(self.step_ends) > warmup >= 1, f"{len(self.step_ends)} steps timed: need more than --warmup {warmup}"
        seconds = self.step_ends[-1] - self.step_ends[warmup - 1]
        timed = self.steps[warmup:]
        real, positions = sum(r for r, _ in timed), sum(p for _, p in timed)
        durations = [end - start for start, end in pairwise(self.step_ends[warmup - 1 :])]
        return {
            "tokens_per_s": real / seconds,
            "padding_share": 1 - real / positions,
            "seconds": seconds,
            "slowest_step_s": max(durations),
            "median_step_s": statistics.median(durations),
        }


def clocked(trainer: Any) -> StepClock:
    """A `StepClock` fed by `trainer`: the tokens of each micro-batch as a training step takes it, a tick at each
    step's end. Not as its collator makes them: accelerate's data loader collates one batch ahead, which counted the
    first micro-batch of each step in the step before, so the timed steps came one micro-batch short (a 16-step run
    with 4 untimed at 8 x 2 read 1/24 low: BENCHMARKS.md, session 23)."""
    from transformers import TrainerCallback

    clock = StepClock()
    training_step = trainer.training_step

    def counted(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        clock.count(inputs)
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted

    class Tick(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    trainer.add_callback(Tick())
    return clock


def step_losses(trainer: Any) -> list[float]:
    """The loss logged at each step (`logging_steps` 1) of a trained `trainer`."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def memory() -> dict[str, float]:
    """What this process took from the GPU (each setup runs in a fresh one): the peak allocated and the most PyTorch's
    caching allocator reserved (GiB), and how often a cudaMalloc failed and it freed its cache to retry (each one a
    device-wide synchronisation); zeros on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_gib": 0.0, "reserved_gib": 0.0, "alloc_retries": 0}
    stats = torch.cuda.memory_stats()
    return {
        "peak_gib": stats["allocated_bytes.all.peak"] / 2**30,
        "reserved_gib": stats["reserved_bytes.all.peak"] / 2**30,
        "alloc_retries": stats["num_alloc_retries"],
    }


PROFILED_STEPS = (5, 7)  # the profiler's window (`profiled`): steady, after the first log and allocations
PHASES = {  # the Trainer's parts, as the profile's markers name them (`perf.gaps` splits the idle time by them)
    "get_batch_samples": "fetch",
    "data_collator": "collate",
    "training_step": "micro_batch",
    "_prepare_inputs": "to_device",
    "compute_loss": "forward",
    "_clip_grad_norm": "clip",
    "_maybe_log_save_evaluate": "log_save_evaluate",
    "log": "log",
}


def marked(trainer: Any) -> None:
    """Wrap the Trainer's parts (`PHASES`, the backward, the step callbacks) in profiler markers."""
    import torch

    def wrap(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return inner(*args, **kwargs)

        setattr(owner, name, run)

    for name, label in PHASES.items():
        wrap(trainer, name, label)
    wrap(trainer.accelerator, "backward", "backward")
    for event in ("on_step_begin", "on_substep_end", "on_step_end"):
        wrap(trainer.callback_handler, event, event)


def profiled(trainer: Any, trace: Path) -> None:
    """Train under torch.profiler over steps 5-7 (`PROFILED_STEPS`); print the operators that took the most device
    and host time, write the chrome trace to `trace` and print where the GPU waited (`perf.gaps`; on the CPU there
    is no GPU time to split)."""
    import torch
    from transformers import TrainerCallback

    from perf import gaps

    device = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device else [])
    key = "self_device_time_total" if device else "self_cpu_time_total"
    first, last = PROFILED_STEPS

    def report(profile: Any) -> None:
        averages = profile.key_averages()
        print(f"profile of steps {first}-{last}:\n{averages.table(sort_by=key, row_limit=25)}", flush=True)
        # the host's side: where it waits for the device (synchronisations) and what it spends launching
        host = averages.table(sort_by="self_cpu_time_total", row_limit=20)
        print(f"host time of steps {first}-{last}:\n{host}", flush=True)
        profile.export_chrome_trace(str(trace))
        where = gaps.report(gaps.summary(gaps.read(trace)))
        print(f"where the GPU waited, steps {first}-{last} ({trace}):\n{where}", flush=True)

    schedule = torch.profiler.schedule(wait=first - 2, warmup=1, active=last - first + 1, repeat=1)
    profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=report)

    class Step(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            profiler.step()

    marked(trainer)
    trainer.add_callback(Step())
    with profiler:
        trainer.train()
