"""Benchmark: training throughput of the train stage's own code vs. plain transformers + peft + bitsandbytes.

    python -m perf.train_speed [--params params.yaml] [--shape llama-8b] [--steps 12] [--batch 4]
        [--lengths mixed|fixed] [--setups project,project-auto,bare,plain] [--loras params,all-r16] [--profile]
        [--processes 1,2] [--repeat 3]

On a random-weight model of a real shape (`perf.shapes`), with the settings of `--params` that the train stage reads
(`model`: precision, dtype, `max_seq_length`; `lora`; `train`: learning rate, optimizer, schedule, packing, sampling;
`chat`; `tokenize`), `--batch` conversations per optimizer step in one pass (unless an `auto` micro-batch splits it)
for `--steps` steps, the same conversations for every setup:
- `mixed`: three rows merged per conversation as `to_sharegpt` merges them, rows with the real data's length mix
  (`perf.data_stages`), cut at `model.max_seq_length` tokens;
- `fixed`: every conversation one long answer, cut at `model.max_seq_length`.

The project's run calls `finetune.model.fit.fit_to_machine`, `finetune.model.load.load_base`, unsloth's `get_peft_model`
and `finetune.training.trainer.build_trainer` (TRL's SFTTrainer as the stage builds it): `project` with the settings as
`--params` writes them, `project-auto` with every `auto` setting (16-bit base where it fits, checkpointing only if
needed, the largest micro-batch that fits), and the variants of `SETUPS`. The baselines (`perf.train_baselines`):
`bare`, unsloth + TRL's SFTTrainer as their documentation writes them; `plain`, transformers + peft + bitsandbytes with
a plain loop (CUDA only: skipped on the CPU). Each setup runs in its own process (unsloth patches transformers when
imported). The first `--warmup` steps are left out; tokens are counted from the batches each step consumed: effective
(non-padding) tokens/s, the padding share, MFU (4 x matmul parameters x tokens: forward and input gradients, over 790
TFLOP/s) and peak GPU memory. With `--processes 1,2` each project setup runs once per count, data-parallel under
torchrun as the train stage does (`--batch` split over the processes, `finetune.training.distributed`; one GPU each, so
skipped without enough): tokens/s summed over them, MFU per GPU, the largest peak, the speed-up over one process, and
how far each step's loss is from the one-process run's (same batches, same order). `--repeat N` runs every setup N
times, each in fresh processes, in rounds (A B A B, not A A B B: a drift over the call spreads over every setup), and
reports the median run; a setup named twice in `--setups` (`bare,project-auto,bare`) gets a row each time.
`--loras params,all-r16` runs every setup with each LoRA of `LORAS` (`params`: `--params`' own; `all-r16`: every linear
projection at r 16; `all-r16-a32`: the same with alpha 32), a row each, labelled with its name (the header: the LoRA
each row's model carried). The table's header shows the settings the runs report: the shape (`pre-quantized 4-bit` for
the 32B and 70B, which `perf.shapes` writes so: they load in 4-bit, `auto` too, and a setup of `load_in_4bit: false` is
refused before any setup runs), `max_seq_length`, the LoRA the model carried. Exits 1 when a setup failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune.config.cli import exit_without_collecting
from finetune.model import fit
from finetune.model.load import ModelConfig
from finetune.training.config import LoraConfig, TrainConfig
from finetune.training.distributed import World, launcher
from perf import lora_paths
from perf.shapes import child_environment, ensure, integers, passed_on
from perf.train_baselines import run_bare, run_plain
from perf.train_measure import PROFILED_STEPS, Configs, clocked, configs, lora_ran, memory, profiled, step_losses
from perf.train_table import combined, header, matmul_parameters, median_run, table


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


def setup_model(model: ModelConfig, settings: dict[str, Any]) -> ModelConfig:
    """`model` with a project setup's `load_in_4bit` over it."""
    return dataclasses.replace(model, load_in_4bit=settings.get("load_in_4bit", model.load_in_4bit))


def setup_configs(
    configs: Configs, settings: dict[str, Any], world: World
) -> tuple[ModelConfig, LoraConfig, TrainConfig]:
    """The model, LoRA and train configs a project setup trains with, as the train stage decides them: `settings` over
    `configs`, the batch split over `world`'s processes (under torchrun, `--processes`), then `auto` ones fitted to
    this machine (`finetune.model.fit.fit_to_machine`)."""
    lora = dataclasses.replace(
        configs.lora,
        use_gradient_checkpointing=settings.get("use_gradient_checkpointing", configs.lora.use_gradient_checkpointing),
    )
    config = dataclasses.replace(
        configs.train,
        micro_batch_size=settings.get("micro_batch_size", configs.train.micro_batch_size),
        micro_batch_tokens=settings.get("micro_batch_tokens", configs.train.micro_batch_tokens),
        padding_free=settings.get("padding_free", configs.train.padding_free),
        packing=settings.get("packing", configs.train.packing),
        train_sampling_strategy=settings.get("sampling", configs.train.train_sampling_strategy),
        dataloader_num_workers=settings.get("workers", configs.train.dataloader_num_workers),
    )
    config = fit.split_batch_over_processes(config, world)
    return fit.fit_to_machine(setup_model(configs.model, settings), lora, config)


def run_project(configs: Configs, data: list, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """The train stage's code. `settings` override `model.load_in_4bit`, `lora.use_gradient_checkpointing`,
    `train.micro_batch_size`, `micro_batch_tokens`, `padding_free`, `packing`, `train_sampling_strategy` and
    `dataloader_num_workers` (`workers`); `auto` ones are decided by `finetune.model.fit.fit_to_machine`, as the
    stage decides them; `blocks` lets padding-free batches into unsloth's compiled blocks (`compiled`) or keeps them
    out (`eager`) whatever the settings, where the stage decides by them (`finetune.model.compiled_blocks`); `mlp`,
    `attention`, `lora_forward` and `pad_rank` choose the LoRA's path (`perf.lora_paths.take`)."""
    import unsloth  # noqa: F401, I001  # isort: skip
    from unsloth import FastLanguageModel

    from finetune.model import compiled_blocks
    from finetune.model.load import load_base
    from finetune.model.patches import apply_speed_patches
    from finetune.tokens.chat import Chat
    from finetune.tokens.encode import tokenized
    from finetune.training.trainer import build_trainer

    world = World.from_environ(dict(os.environ))  # under torchrun (`--processes`): each takes its share of the batch
    model_config, lora, config = setup_configs(configs, settings, world)
    chosen = {key.removeprefix("fit."): value for key, value in fit.fit_tags(model_config, lora, config).items()}
    print(f"settings: {chosen}", flush=True)
    apply_speed_patches()
    model, tokenizer = load_base(model_config, world.gpu)
    blocks = settings.get("blocks")
    if blocks is None:  # as the train stage decides
        compiled = compiled_blocks.compile_padding_free_blocks(model, model_config.load_in_4bit, lora)
    else:
        compiled = compiled_blocks.let_in(model) if blocks == "compiled" else []
    print(f"padding-free batches into compiled blocks of: {compiled}")
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
    print("\n".join(lora_paths.take(model, compiled, settings)))  # the stage's LoRA path, or the setup's
    chat = Chat(tokenizer, configs.chat)
    dataset = tokenized(chat, data, model_config.max_seq_length, configs.tokenize)  # as the tokenize stage writes
    trainer = build_trainer(model, tokenizer, dataset, model_config, config, work / "out")
    clock = clocked(trainer)
    if settings.get("profile"):
        profiled(trainer, work / "trace.json.gz")
    else:
        trainer.train()
    print("\n".join(compiled_blocks.report(model)))
    ran = {"lora": lora_ran(model), "max_seq_length": model_config.max_seq_length}
    return {"clock": clock, "settings": chosen, "losses": step_losses(trainer)} | ran


EXPANDABLE = "expandable_segments:True"
AUTO = {"load_in_4bit": "auto", "use_gradient_checkpointing": "auto", "micro_batch_size": "auto"}
TOKENS = {"load_in_4bit": "auto", "use_gradient_checkpointing": "auto", "micro_batch_tokens": "auto"}
SETUPS = {  # name: (code path, settings over --params')
    "project": (run_project, {}),  # the settings as --params writes them (the real run's: 4-bit, checkpointing)
    "project-nogc": (run_project, {"use_gradient_checkpointing": False}),
    "project-auto": (run_project, AUTO),  # every `auto` setting, fitted to the GPU
    "project-auto-padded": (run_project, AUTO | {"padding_free": False}),  # padded, unsloth's per-block compile
    "project-auto-packed": (run_project, AUTO | {"packing": True}),  # conversations packed into full-length rows
    # every conversation of a step in one micro-batch, no checkpointing: what an `auto` micro-batch sized by the data's
    # tokens, not by `max_seq_length`-long conversations, would take where a step's tokens fit (an experiment)
    "project-auto-one-pass": (run_project, {"load_in_4bit": "auto", "use_gradient_checkpointing": False}),
    # padding-free batches kept out of unsloth's compiled decoder blocks or let in, whatever the settings (the stage
    # lets them in where they were measured faster: finetune/model/compiled_blocks.py)
    "project-auto-eager-blocks": (run_project, AUTO | {"blocks": "eager"}),
    "project-auto-compiled-blocks": (run_project, AUTO | {"blocks": "compiled"}),
    "project-compiled-blocks": (run_project, {"blocks": "compiled"}),  # the seed's 4-bit base and checkpointing
    "project-auto-random": (run_project, AUTO | {"sampling": "random"}),  # conversations dealt to GPUs blindly
    "project-auto-workers": (run_project, AUTO | {"workers": 2}),  # two DataLoader workers collate the next batches
    # PyTorch's caching allocator growing its segments instead of retrying cudaMalloc when padding-free batches of
    # varying size fragment the cache (some steps of the 8B shape ran 20-30 % slower than the others: BENCHMARKS.md)
    "project-auto-expandable": (run_project, AUTO | {"environ": {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}}),
    "project-16bit-nogc": (run_project, {"load_in_4bit": False, "use_gradient_checkpointing": False}),
    "project-auto-fused-mlp": (run_project, AUTO | {"mlp": "fused"}),  # compiled blocks, unsloth's fused LoRA MLP
    "project-auto-tokens": (run_project, TOKENS),  # a step in passes of the tokens that fit (train.micro_batch_tokens)
    "project-tokens-eager-blocks": (run_project, TOKENS | {"blocks": "eager"}),  # the stage's r 16 path to session 25
    "project-tokens-peft-lora": (run_project, TOKENS | {"mlp": "peft", "attention": "peft"}),  # all through peft's
    "project-tokens-fused-attention": (run_project, TOKENS | {"mlp": "peft"}),  # the stage's r 16 path in session 26
    "project-tokens-addmm-lora": (run_project, TOKENS | {"lora_forward": "addmm"}),  # peft's layers: unsloth's addmm
    "project-tokens-peft-addmm": (run_project, TOKENS | {"mlp": "peft", "attention": "peft", "lora_forward": "addmm"}),
    "project-tokens-pad64": (run_project, TOKENS | {"pad_rank": 64}),  # the LoRA products' inner size padded to 64
    "bare": (run_bare, {}),  # unsloth + TRL's SFTTrainer, library defaults, the project-auto split of the batch
    "plain": (run_plain, {"cuda": True}),  # transformers + peft + bitsandbytes NF4 on cuda:0
}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORAS = {  # name: `lora.*` over --params' (each row's header entry says what the model carried)
    "params": {},  # --params' own: the seed's r 4 on q/k/v/o in params.yaml
    "all-r16": {"r": 16, "target_modules": ALL_LINEAR},  # every linear projection at r 16: TRL's LoRA guidance
    "all-r16-a32": {"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR},  # the same, scaled by 2 (alpha 2 r)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file, as the stages read")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--lengths", choices=("mixed", "fixed"), default="mixed")
    parser.add_argument("--batch", type=int, default=4, help="conversations per optimizer step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--setups", default="project,plain", help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-bench"))
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"project setups: print where steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[1]} spend time, and where the "
        "GPU waits",
    )
    parser.add_argument(
        "--processes", type=integers, default=[1], help="project setups: data-parallel, one per GPU; 1,2 runs both"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setup; the table gives the median")
    parser.add_argument("--loras", default="params", help=f"comma-separated, of {', '.join(LORAS)}: every setup each")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-lora", default="params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, known in (("--setups", args.setups, SETUPS), ("--loras", args.loras, LORAS)):
        unknown = [name for name in value.split(",") if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup must be >= 1 and below --steps ({args.steps}), got {args.warmup}")
    if args.profile and args.steps < PROFILED_STEPS[1]:
        parser.error(f"--profile records steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[1]}: --steps must be at least 7")
    work = args.work.resolve()
    model_dir = work / args.shape

    if args.child:  # one setup, in this process (one of `--processes` under torchrun)
        exit_without_collecting()
        run, settings = SETUPS[args.child]
        data = conversations(args.lengths, args.batch * args.steps)
        loaded = configs(args.params, model_dir, args.batch, args.steps)
        loaded = dataclasses.replace(loaded, lora=dataclasses.replace(loaded.lora, **LORAS[args.child_lora]))
        result = run(loaded, data, settings | {"profile": args.profile}, work)
        summary = result.pop("clock").summary(args.warmup)
        rank = os.environ.get("RANK", "0")
        (work / f"{args.child}.{args.child_lora}.rank{rank}.json").write_text(json.dumps(result | summary | memory()))
        return 0

    import torch

    root = Path(__file__).resolve().parents[1]
    env = child_environment(root, work)
    work.mkdir(parents=True, exist_ok=True)
    ensure(args.shape, model_dir, root, env)
    model = configs(args.params, model_dir, args.batch, args.steps).model
    for setup in args.setups.split(","):  # a 16-bit load of a pre-quantized shape fails here, before any setup runs
        if SETUPS[setup][0] is run_project:
            fit.resolved(setup_model(model, SETUPS[setup][1]))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # LoRA: forward (2 per parameter) and the backward's input gradients (2); frozen weights get no gradient
    flops_per_token = 4 * matmul_parameters(model_dir)
    passed = passed_on(argv, args.params, work)
    plans = []  # (label, processes, command, its results, its environment), in the order of --loras and --setups
    for setup, lora in ((setup, lora) for lora in args.loras.split(",") for setup in args.setups.split(",")):
        run, settings = SETUPS[setup]
        label = setup if lora == "params" else f"{setup} ({lora})"
        if settings.get("cuda") and not gpus:
            print(f"{label}: skipped, it needs a CUDA GPU (bitsandbytes NF4 on cuda:0) and this machine has none")
            continue
        for count in args.processes if run is run_project else [1]:  # the baselines run on one GPU
            if count > max(gpus, 1):
                print(f"{label} on {count} processes: skipped, it needs {count} GPUs and this machine has {gpus}")
                continue
            arguments = [*passed, "--child", setup, "--child-lora", lora]
            command = [sys.executable, "-m", "perf.train_speed", *arguments]
            if count > 1:  # as the train stage starts itself: torchrun, one process per GPU
                command = launcher(count, "perf.train_speed", arguments, {})
            environ = env | settings.get("environ", {})  # read as the child's torch starts
            plans.append((label, count, command, f"{setup}.{lora}.rank*.json", environ))
    runs: list[list[dict[str, Any]]] = [[] for _ in plans]  # of each plan, in rounds
    failed: list[str] = []
    for _ in range(args.repeat):  # in rounds, every setup once a round: a drift over the call spreads over them all
        for (label, count, command, results, environ), done in zip(plans, runs, strict=True):
            if f"{label} on {count}" in failed:
                continue
            for stale in work.glob(results):
                stale.unlink()
            if subprocess.run(command, check=False, env=environ, cwd=root).returncode != 0:
                print(f"{label} on {count} processes failed: see its output above", flush=True)
                failed.append(f"{label} on {count}")
                continue
            done.append(combined([json.loads(f.read_text()) for f in sorted(work.glob(results))]))
    rows = [(label, count, median_run(done)) for (label, count, *_), done in zip(plans, runs, strict=True) if done]
    if rows:
        print(f"\n{header(args.shape, model_dir, rows, args)}\n")
        print("\n".join(table(rows, args, flops_per_token)))
    for setup, count, r in rows:
        if r["losses"]:
            print(f"loss per step, {setup} on {count}: {' '.join(f'{loss:.4f}' for loss in r['losses'])}")
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    elif not rows:
        print("no setup ran", flush=True)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
