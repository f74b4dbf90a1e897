"""Benchmark: training throughput of the train stage's own code vs. plain transformers + peft + bitsandbytes.

    python -m benchmarks.train_speed [--shape llama-8b] [--steps 12] [--batch 4] [--lengths mixed|fixed]

On a random-weight model of a real shape (`benchmarks.shapes`), 4-bit, LoRA with the `lora.*` settings of
params.yaml, the same conversations for both:
- `mixed`: three rows merged per conversation as `to_sharegpt` merges them, rows with the real data's length mix
  (`benchmarks.data_stages`), cut at 2,048 tokens;
- `fixed`: every sequence exactly 2,048 tokens.

The project's run calls `stages.model.load_base`, unsloth's `get_peft_model` and `stages.train.make_trainer` (TRL's
SFTTrainer with the stage's settings). The baseline loads with `BitsAndBytesConfig` (NF4, bf16 compute), adds the
LoRA with peft (`prepare_model_for_kbit_training`), uses SDPA, gradient checkpointing, a padded batch and bf16
autocast, and trains with a plain loop and 8-bit AdamW.
Each runs in its own process (unsloth patches transformers when imported). The first `--warmup` steps are left
out; tokens are counted from the batches each step consumed: effective (non-padding) tokens/s, the padding
share, MFU (4 x matmul parameters x tokens: forward and input gradients, over 790 TFLOP/s) and peak GPU memory.
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

MAX_LENGTH = 2048
PEAK_FLOPS = 790e12  # bf16 dense matmul rate measured on this workplace's H100/H200 (the datasheet says 989)


def conversations(kind: str, count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Training conversations: `mixed` merges three generated rows each; `fixed` has one very long answer."""
    from benchmarks.data_stages import make_rows, single_turns

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
        self.batches: list[tuple[int, int]] = []  # (real tokens, positions incl. padding) per batch
        self.step_ends: list[float] = []

    def count(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        self.batches.append((real, int(ids.numel())))
        return batch

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def summary(self, warmup: int) -> dict[str, float]:
        """Effective tokens/s and padding share over the steps after the first `warmup`."""
        seconds = self.step_ends[-1] - self.step_ends[warmup - 1]
        timed = self.batches[warmup : len(self.step_ends)]
        real, positions = sum(r for r, _ in timed), sum(p for _, p in timed)
        return {"tokens_per_s": real / seconds, "padding_share": 1 - real / positions, "seconds": seconds}


def peak_gib() -> float:
    """Peak GPU memory allocated by this process (each setup runs in a fresh one), or 0 on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def run_project(model_dir: str, data: list, batch: int, steps: int, checkpointing: Any, work: Path) -> dict:
    import unsloth  # noqa: F401, I001  # isort: skip
    import dataclasses

    from datasets import Dataset
    from transformers import TrainerCallback
    from unsloth import FastLanguageModel

    from stages import params
    from stages.chat import Chat, ChatConfig
    from stages.model import ModelConfig, load_base
    from stages.train import LoraConfig, TrainConfig, make_trainer

    root = Path(__file__).resolve().parents[1]
    lora = dataclasses.replace(
        params.load(LoraConfig, root / "params.yaml", "lora"), use_gradient_checkpointing=checkpointing
    )
    model_config = ModelConfig(model_dir, None, MAX_LENGTH, load_in_4bit=True, dtype=None)
    model, tokenizer = load_base(model_config)
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
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
    )
    dataset = Dataset.from_list([{"messages": m} for m in data])
    chat = Chat(tokenizer, params.load(ChatConfig, root / "params.yaml", "chat"))
    trainer, _ = make_trainer(model, chat, dataset, model_config, config, work / "out")
    clock = StepClock()
    collate = trainer.data_collator
    trainer.data_collator = lambda examples: clock.count(collate(examples))

    class Tick(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    trainer.add_callback(Tick())
    trainer.train()
    return {"clock": clock, "peak_gib": peak_gib()}


def run_plain(model_dir: str, data: list, batch: int, steps: int, checkpointing: Any, work: Path) -> dict:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from stages.chat import Chat, ChatConfig

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
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
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
    return {"clock": clock, "peak_gib": peak_gib()}


SETUPS = {  # name: (code path, gradient checkpointing)
    "project": (run_project, "unsloth"),  # the seed's settings
    "project-nogc": (run_project, False),
    "plain": (run_plain, True),
}


def matmul_parameters(model_dir: Path) -> float:
    """Parameters that every token multiplies through (all linear layers and the output layer)."""
    config = json.loads((model_dir / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + h * config["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--lengths", choices=("mixed", "fixed"), default="mixed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setups", default="project,plain", help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    model_dir = work / args.shape
    data = conversations(args.lengths, args.batch * args.steps)

    if args.child:  # one setup, in this process
        run, checkpointing = SETUPS[args.child]
        result = run(str(model_dir), data, args.batch, args.steps, checkpointing, work)
        summary = result.pop("clock").summary(args.warmup)
        (work / f"{args.child}.json").write_text(json.dumps(result | summary))
        return

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.shapes", args.shape, str(model_dir)], check=True, env=env)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    # LoRA: forward (2 per parameter) and the backward's input gradients (2); frozen weights get no gradient
    flops_per_token = 4 * matmul_parameters(model_dir)
    rows = []
    for setup in args.setups.split(","):
        command = [sys.executable, "-m", "benchmarks.train_speed", *sys.argv[1:], "--child", setup]
        if subprocess.run(command, check=False, env=env, cwd=root).returncode != 0:
            print(f"{setup} failed: see its output above", flush=True)
            continue
        rows.append((setup, json.loads((work / f"{setup}.json").read_text())))
    print(f"\n{args.shape}, 4-bit, LoRA r 4 q/k/v/o, batch {args.batch}, {args.lengths} lengths, {card}\n")
    print("| setup | effective tokens/s | padding share | MFU | peak GiB | timed s |\n|---|---|---|---|---|---|")
    for setup, r in rows:
        mfu = r["tokens_per_s"] * flops_per_token / PEAK_FLOPS
        print(
            f"| {setup} | {r['tokens_per_s']:,.0f} | {r['padding_share']:.1%} | {mfu:.1%} | {r['peak_gib']:.1f} "
            f"| {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
