"""Benchmark: training throughput of the train stage's own code vs. plain transformers + peft + bitsandbytes.

    python -m perf.train_speed [--shape llama-8b] [--steps 12] [--batch 4] [--lengths mixed|fixed]
        [--setups project,project-auto,bare,plain] [--profile] [--processes 1,2] [--repeat 3]

On a random-weight model of a real shape (`perf.shapes`), LoRA with the `lora.*` settings of params.yaml,
`--batch` conversations per optimizer step, the same conversations for every setup:
- `mixed`: three rows merged per conversation as `to_sharegpt` merges them, rows with the real data's length mix
  (`perf.data_stages`), cut at 2,048 tokens;
- `fixed`: every sequence exactly 2,048 tokens.

The project's run calls `stages.train.fitted`, `finetune.model.load.load_base`, unsloth's `get_peft_model` and
`stages.train.make_trainer` (TRL's SFTTrainer with the stage's settings): `project` with the seed's settings (4-bit,
checkpointing "unsloth", the whole batch in one pass), `project-auto` with every `auto` setting
(`finetune.model.fit`: 16-bit base where it fits, checkpointing only if needed, the largest micro-batch that fits).
The baseline loads with `BitsAndBytesConfig` (NF4, bf16 compute), adds the LoRA with peft
(`prepare_model_for_kbit_training`), uses SDPA, gradient checkpointing, a padded batch and bf16 autocast, and trains
with a plain loop and 8-bit AdamW. `bare` is unsloth + TRL's SFTTrainer as their documentation writes them on the
same rows and split as `project-auto`, none of the project's code in the loop (`run_bare`). Each runs in its own
process (unsloth patches transformers when imported). The first `--warmup` steps are left out; tokens are counted
from the batches each step consumed: effective (non-padding) tokens/s, the padding share, MFU (4 x matmul parameters
x tokens: forward and input gradients, over 790 TFLOP/s) and peak GPU memory. With `--processes 1,2` each project
setup runs once per count, data-parallel under torchrun as the train stage does (`--batch` split over the processes,
`finetune.training.distributed`): tokens/s summed over them, MFU per GPU, the largest peak, the speed-up over one
process, and how far each step's loss is from the one-process run's (same batches, same order). `--repeat N` runs
every setup N times, each in fresh processes, and reports the median run (and each run's tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune.training.distributed import launcher

MAX_LENGTH = 2048
PEAK_FLOPS = 790e12  # bf16 dense matmul rate measured on this workplace's H100/H200 (the datasheet says 989)


def conversations(kind: str, count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Training conversations: `mixed` merges three generated rows each; `fixed` has one very long answer."""
    from perf.data_stages import make_rows, single_turns

    if kind == "fixed":
        rows = make_rows(count, seed)
        return [
            [{"role": "user", "content": u}, {"role": "assistant", "content": (a + " ") * 40}]
            for u, a in zip(rows["user"], rows["assistant"], strict=True)
        ]
    turns = single_turns(3 * count, seed)
    return [turns[3 * i] + turns[3 * i + 1] + turns[3 * i + 2] for i in range(count)]


class StepClock:
    """Per-step wall times (device synchronised) and the tokens of the batches each step consumed."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []  # (real tokens, positions incl. padding) per optimizer step
        self.step_ends: list[float] = []
        self.pending = (0, 0)  # of the micro-batches collated since the last step ended

    def count(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        self.pending = (self.pending[0] + real, self.pending[1] + int(ids.numel()))
        return batch

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.steps.append(self.pending)
        self.pending = (0, 0)

    def summary(self, warmup: int) -> dict[str, float]:
        """Effective tokens/s and padding share over the steps after the first `warmup`."""
        seconds = self.step_ends[-1] - self.step_ends[warmup - 1]
        timed = self.steps[warmup:]
        real, positions = sum(r for r, _ in timed), sum(p for _, p in timed)
        return {"tokens_per_s": real / seconds, "padding_share": 1 - real / positions, "seconds": seconds}


def clocked(trainer: Any) -> StepClock:
    """A `StepClock` fed by `trainer`: the tokens of each batch its collator makes, a tick at each step's end."""
    from transformers import TrainerCallback

    clock = StepClock()
    collate = trainer.data_collator
    trainer.data_collator = lambda examples: clock.count(collate(examples))

    class Tick(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    trainer.add_callback(Tick())
    return clock


def step_losses(trainer: Any) -> list[float]:
    """The loss logged at each step (`logging_steps` 1) of a trained `trainer`."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def peak_gib() -> float:
    """Peak GPU memory allocated by this process (each setup runs in a fresh one), or 0 on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


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
    """Train under torch.profiler over steps 5-7 (steady: after the first log and allocations); print the operators
    that took the most device and host time, write the chrome trace to `trace` and print where the GPU waited
    (`perf.gaps`)."""
    import torch
    from benchmarks import gaps
    from transformers import TrainerCallback

    device = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device else [])
    key = "self_device_time_total" if device else "self_cpu_time_total"

    def report(profile: Any) -> None:
        averages = profile.key_averages()
        print(f"profile of steps 5-7:\n{averages.table(sort_by=key, row_limit=25)}", flush=True)
        # the host's side: where it waits for the device (synchronisations) and what it spends launching
        print(f"host time of steps 5-7:\n{averages.table(sort_by='self_cpu_time_total', row_limit=20)}", flush=True)
        profile.export_chrome_trace(str(trace))
        print(f"where the GPU waited, steps 5-7 ({trace}):\n{gaps.report(gaps.summary(gaps.read(trace)))}", flush=True)

    schedule = torch.profiler.schedule(wait=3, warmup=1, active=3, repeat=1)
    profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=report)

    class Step(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            profiler.step()

    marked(trainer)
    trainer.add_callback(Step())
    with profiler:
        trainer.train()


def run_project(model_dir: str, data: list, batch: int, steps: int, settings: dict[str, Any], work: Path) -> dict:
    """The train stage's code; `settings` override `model.load_in_4bit`, `lora.use_gradient_checkpointing` and
    `train.micro_batch_size` (`auto` ones are decided by `stages.train.fitted`, as the stage decides them)."""
    import unsloth  # noqa: F401, I001  # isort: skip
    import dataclasses

    from unsloth import FastLanguageModel

    from finetune.config import params
    from finetune.model.load import ModelConfig, load_base
    from finetune.tokens.chat import Chat, ChatConfig
    from finetune.training.distributed import World
    from stages.tokenize import tokenized
    from stages.train import LoraConfig, TrainConfig, fit_tags, fitted, make_trainer, shared_out

    root = Path(__file__).resolve().parents[1]
    lora = dataclasses.replace(
        params.load(LoraConfig, root / "params.yaml", "lora"),
        use_gradient_checkpointing=settings.get("use_gradient_checkpointing", "unsloth"),
    )
    stage = params.load(TrainConfig, root / "params.yaml", "train")
    model_config = ModelConfig(model_dir, None, MAX_LENGTH, settings.get("load_in_4bit", True), dtype=None)
    config = TrainConfig(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        max_steps=steps,
        num_train_epochs=1.0,
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_8bit",
        lr_scheduler_type="constant",
        logging_steps=1,
        seed=3407,
        micro_batch_size=settings.get("micro_batch_size"),
        padding_free=settings.get("padding_free"),
        packing=settings.get("packing", False),
        train_sampling_strategy=settings.get("sampling", stage.train_sampling_strategy),
    )
    world = World.from_environ(dict(os.environ))  # under torchrun (`--processes`): each takes its share of the batch
    config = shared_out(config, world)
    model_config, lora, config = fitted(model_config, lora, config)
    chosen = {key.removeprefix("fit."): value for key, value in fit_tags(model_config, lora, config).items()}
    print(f"settings: {chosen}", flush=True)
    model, tokenizer = load_base(model_config, world.gpu)
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
    chat = Chat(tokenizer, params.load(ChatConfig, root / "params.yaml", "chat"))
    dataset = tokenized(chat, data, model_config.max_seq_length)  # as the tokenize stage writes them
    trainer = make_trainer(model, tokenizer, dataset, model_config, config, work / "out")
    clock = clocked(trainer)
    if settings.get("profile"):
        profiled(trainer, work / "trace.json.gz")
    else:
        trainer.train()
    return {"clock": clock, "peak_gib": peak_gib(), "settings": chosen, "losses": step_losses(trainer)}


def run_bare(model_dir: str, data: list, batch: int, steps: int, settings: dict[str, Any], work: Path) -> dict:
    """unsloth + TRL's SFTTrainer as their documentation writes them, none of the project's code in the loop: the
    same rows as the project trains on (the tokenize stage's ids and labels), the same split of the batch and 16-bit
    base without checkpointing as `project-auto` chooses (`stages.train.fitted`), library defaults for the rest
    (no tracking, no token count, no callbacks). On rows of mixed length unsloth pads them (it turns padding-free
    batching off for tokenized data), so compare it with the project on `--lengths fixed`."""
    import unsloth  # noqa: F401, I001  # isort: skip
    import dataclasses

    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from finetune.config import params
    from finetune.model.load import ModelConfig
    from finetune.tokens.chat import Chat, ChatConfig
    from stages.tokenize import tokenized
    from stages.train import LoraConfig, TrainConfig, fitted

    root = Path(__file__).resolve().parents[1]
    lora = params.load(LoraConfig, root / "params.yaml", "lora")
    split = TrainConfig(batch, 1, 2e-4, steps, 1.0, 0, 0.0, "adamw_8bit", "constant", 1, 3407, micro_batch_size="auto")
    model_config = ModelConfig(model_dir, None, MAX_LENGTH, "auto", dtype=None)
    lora = dataclasses.replace(lora, use_gradient_checkpointing="auto")
    model_config, lora, split = fitted(model_config, lora, split)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=MAX_LENGTH, load_in_4bit=model_config.load_in_4bit, dtype=None
    )
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
    chat = Chat(tokenizer, params.load(ChatConfig, root / "params.yaml", "chat"))
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=tokenized(chat, data, MAX_LENGTH),
        args=SFTConfig(
            output_dir=str(work / "bare"),
            per_device_train_batch_size=split.per_device_train_batch_size,
            gradient_accumulation_steps=split.gradient_accumulation_steps,
            max_steps=steps,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            optim="adamw_8bit",
            logging_steps=1,
            seed=3407,
            bf16=True,
            max_length=MAX_LENGTH,
            report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
    )
    clock = clocked(trainer)
    trainer.train()
    chosen = {"load_in_4bit": model_config.load_in_4bit, "use_gradient_checkpointing": lora.use_gradient_checkpointing}
    chosen |= {"per_device_train_batch_size": split.per_device_train_batch_size}
    return {"clock": clock, "peak_gib": peak_gib(), "settings": chosen, "losses": step_losses(trainer)}


def run_plain(model_dir: str, data: list, batch: int, steps: int, settings: dict[str, Any], work: Path) -> dict:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.tokens.chat import Chat, ChatConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    rendered = [Chat(tokenizer, ChatConfig()).render(m) for m in data]  # the same text as the project trains on
    encoded = [ids[:MAX_LENGTH] for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    generator = torch.Generator().manual_seed(3407)
    order = torch.randperm(len(encoded), generator=generator).tolist()
    clock = StepClock()
    model.train()
    for step in range(steps):
        rows = [encoded[i] for i in order[step * batch : (step + 1) * batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        clock.count({"input_ids": ids, "attention_mask": mask})
        with torch.autocast(device_type=device, dtype=torch.bfloat16):  # as Trainer's bf16=True runs it
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return {"clock": clock, "peak_gib": peak_gib(), "losses": []}


EXPANDABLE = "expandable_segments:True"
AUTO = {"load_in_4bit": "auto", "use_gradient_checkpointing": "auto", "micro_batch_size": "auto"}
SETUPS = {  # name: (code path, settings)
    "project": (run_project, {}),  # the seed's settings: 4-bit, checkpointing "unsloth", the batch as given
    "project-nogc": (run_project, {"use_gradient_checkpointing": False}),
    "project-auto": (run_project, AUTO),  # every `auto` setting, fitted to the GPU
    "project-auto-padded": (run_project, AUTO | {"padding_free": False}),  # padded, unsloth's per-block compile
    "project-auto-packed": (run_project, AUTO | {"packing": True}),  # conversations packed into 2,048-token rows
    "project-auto-random": (run_project, AUTO | {"sampling": "random"}),  # conversations dealt to GPUs blindly
    # PyTorch's caching allocator growing its segments instead of retrying cudaMalloc when padding-free batches of
    # varying size fragment the cache (some steps of the 8B shape ran 20-30 % slower than the others: BENCHMARKS.md)
    "project-auto-expandable": (run_project, AUTO | {"environ": {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}}),
    "project-16bit-nogc": (run_project, {"load_in_4bit": False, "use_gradient_checkpointing": False}),
    "bare": (run_bare, {}),  # unsloth + TRL's SFTTrainer, library defaults, the project-auto split of the batch
    "plain": (run_plain, {}),
}


def combined(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every process's result: tokens/s summed (the steps are synchronised, so the timed windows
    match), padding share averaged, the largest peak memory and time, rank 0's settings."""
    return ranks[0] | {
        "tokens_per_s": sum(r["tokens_per_s"] for r in ranks),
        "padding_share": sum(r["padding_share"] for r in ranks) / len(ranks),
        "peak_gib": max(r["peak_gib"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one setup (each a fresh process), the one of median tokens/s (the lower middle of an even
    count), with every run's tokens/s beside it."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2] | {"each": [run["tokens_per_s"] for run in runs]}


def matmul_parameters(model_dir: Path) -> float:
    """Parameters that every token multiplies through (all linear layers and the output layer)."""
    from types import SimpleNamespace

    from finetune.model.fit import Shape

    shape = Shape.of(SimpleNamespace(**json.loads((model_dir / "config.json").read_text())))
    return shape.linear_parameters + shape.hidden * shape.vocab


def counts(text: str) -> list[int]:
    """`--processes`: `"1,2"` -> `[1, 2]`."""
    return [int(count) for count in text.split(",")]


def loss_gap(losses: list[float], reference: list[float]) -> float:
    """The largest relative difference between two loss curves, step by step (NaN if their lengths differ)."""
    if len(losses) != len(reference) or not losses:
        return float("nan")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--lengths", choices=("mixed", "fixed"), default="mixed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setups", default="project,plain", help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-bench"))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="project setups: print where steps 5-7 spend time, and where the GPU waits",
    )
    parser.add_argument(
        "--processes", type=counts, default=[1], help="project setups: data-parallel, one per GPU; 1,2 runs both"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setup; the table gives the median")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    model_dir = work / args.shape
    data = conversations(args.lengths, args.batch * args.steps)

    if args.child:  # one setup, in this process (one of `--processes` under torchrun)
        run, settings = SETUPS[args.child]
        result = run(str(model_dir), data, args.batch, args.steps, settings | {"profile": args.profile}, work)
        summary = result.pop("clock").summary(args.warmup)
        rank = os.environ.get("RANK", "0")
        (work / f"{args.child}.rank{rank}.json").write_text(json.dumps(result | summary))
        return

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "perf.shapes", args.shape, str(model_dir)], check=True, env=env)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    # LoRA: forward (2 per parameter) and the backward's input gradients (2); frozen weights get no gradient
    flops_per_token = 4 * matmul_parameters(model_dir)
    rows = []
    for setup in args.setups.split(","):
        run = SETUPS[setup][0]
        for count in args.processes if run is run_project else [1]:  # the baselines run on one GPU
            arguments = [*sys.argv[1:], "--child", setup]
            command = [sys.executable, "-m", "perf.train_speed", *arguments]
            if count > 1:  # as the train stage starts itself: torchrun, one process per GPU
                command = launcher(count, "perf.train_speed", arguments, {})
            runs = []
            for _ in range(args.repeat):
                for stale in work.glob(f"{setup}.rank*.json"):
                    stale.unlink()
                environ = env | SETUPS[setup][1].get("environ", {})  # read as the child's torch starts
                if subprocess.run(command, check=False, env=environ, cwd=root).returncode != 0:
                    print(f"{setup} on {count} processes failed: see its output above", flush=True)
                    break
                runs.append(combined([json.loads(f.read_text()) for f in sorted(work.glob(f"{setup}.rank*.json"))]))
            if runs:
                rows.append((setup, count, median_run(runs)))
    print(f"\n{args.shape}, LoRA r 4 q/k/v/o, batch {args.batch} per step, {args.lengths} lengths, {card}\n")
    print(
        f"| setup | processes | settings | effective tokens/s (median of {args.repeat}) | each run | × 1 process "
        "| padding share | MFU per GPU | peak GiB | timed s | loss vs 1 process |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setup, count, r in rows:
        single = next((one for name, n, one in rows if name == setup and n == 1), None)
        mfu = r["tokens_per_s"] * flops_per_token / PEAK_FLOPS / count
        plain = {"load_in_4bit": True, "use_gradient_checkpointing": True, "per_device_train_batch_size": args.batch}
        settings = r.get("settings") or plain
        described = ", ".join(f"{key} {value}" for key, value in settings.items())
        speedup = f"{r['tokens_per_s'] / single['tokens_per_s']:.2f}×" if single and count > 1 else ""
        apart = f"{loss_gap(r['losses'], single['losses']):.2%}" if single and count > 1 else ""
        each = " ".join(f"{tokens:,.0f}" for tokens in r["each"])
        print(
            f"| {setup} | {count} | {described} | {r['tokens_per_s']:,.0f} | {each} "
            f"| {speedup} | {r['padding_share']:.1%} "
            f"| {mfu:.1%} | {r['peak_gib']:.1f} | {r['seconds']:.1f} | {apart} |"
        )
    for setup, count, r in rows:
        if r["losses"]:
            print(f"loss per step, {setup} on {count}: {' '.join(f'{loss:.4f}' for loss in r['losses'])}")


if __name__ == "__main__":
    main()
