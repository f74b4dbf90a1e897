"""Benchmark: one greedy decode step of evaluate's generation, by batch size and prompt length, with unsloth's own
decode attention and with the project's (`finetune.model.patches.grouped_decode_attention`).

    python -m perf.decode_speed [--params params.yaml] [--shape llama-8b] [--batches 32,64,128] [--lengths 1024]
        [--new-tokens 64] [--work /tmp/decode-bench]

Loads a random-weight model of a real shape (`perf.shapes`) as evaluate loads the base (`model.*` of `--params`,
`auto` decided for this machine, 4-bit or 16-bit), puts an untrained adapter of `lora.*` on it, and generates
greedily for a batch of prompts of random token ids, their lengths between half of each `--lengths` and all of it,
left-padded as evaluate pads them (`finetune.evaluation.answers.generate`); once with 1 new token and once with
`--new-tokens` (EOS never ends them early): a decode step's time is the difference over the steps between. Each
configuration runs first with unsloth's attention, then with the patch; the greedy tokens of both are compared (the
same up to a rare tie: the kernels round differently). Prints the settings and a table: batch, prompt length, ms a
step with each, the speed-up, the share of the new tokens that agree, peak GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune.config.cli import exit_without_collecting
from finetune.config.params import load
from perf.shapes import child_environment, described, ensure, integers, passed_on


def timed_generate(model: Any, tokenizer: Any, prompts: Any, new_tokens: int) -> tuple[float, Any]:
    """Seconds for greedy generation of exactly `new_tokens` tokens a prompt (`prompts`: padded, as the tokenizer
    pads them), and the tokens."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, output[:, prompts["input_ids"].shape[1] :]


def step_ms(model: Any, tokenizer: Any, prompts: Any, new_tokens: int) -> tuple[float, Any]:
    """Milliseconds a decode step: generation of `new_tokens` less that of one, over the steps between (after an
    untimed generation of two: the first call's set-up left out)."""
    timed_generate(model, tokenizer, prompts, 2)
    one, _ = timed_generate(model, tokenizer, prompts, 1)
    many, tokens = timed_generate(model, tokenizer, prompts, new_tokens)
    return (many - one) / (new_tokens - 1) * 1000, tokens


def measure(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The table's lines: each batch size and prompt length, unsloth's attention, then the patch's."""
    import unsloth  # noqa: F401, I001  # isort: skip
    import torch
    from unsloth import FastLanguageModel
    from unsloth.models import llama

    from finetune.model import fit
    from finetune.model.load import ModelConfig, load_base
    from finetune.model.patches import grouped_decode_attention, unsloth_decode_attention
    from finetune.training.config import LoraConfig

    config = dataclasses.replace(load(ModelConfig, args.params, "model"), model_name=str(model_dir), revision=None)
    config = fit.resolved(config)
    model, tokenizer = load_base(config)
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(load(LoraConfig, args.params, "lora")))
    model.eval()
    graphs = os.environ.get("UNSLOTH_DECODE_CUDA_GRAPHS", "unset")  # unsloth's CUDA-graph replay of the step
    print(
        f"settings: 4-bit {config.load_in_4bit}, dtype {config.dtype}, UNSLOTH_DECODE_CUDA_GRAPHS {graphs}, "
        f"{described(model_dir)}",
        flush=True,
    )
    unsloth_attention = unsloth_decode_attention()
    generator = torch.Generator().manual_seed(0)
    lines = [
        "| batch | prompt tokens, up to | ms a step, unsloth | ms a step, grouped | speed-up | same tokens "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        for batch in args.batches:
            sizes = torch.randint(length // 2, length + 1, (batch,), generator=generator).tolist()
            ids = [torch.randint(100, len(tokenizer), (size,), generator=generator).tolist() for size in sizes]
            padded = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")
            prompts = padded.to(next(model.parameters()).device)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            llama.scaled_dot_product_attention = unsloth_attention
            before, tokens_before = step_ms(model, tokenizer, prompts, args.new_tokens)
            grouped_decode_attention()
            after, tokens_after = step_ms(model, tokenizer, prompts, args.new_tokens)
            same = (tokens_before == tokens_after).float().mean().item()
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            lines.append(
                f"| {batch} | {length} | {before:.1f} | {after:.1f} | {before / after:.2f}× | {same:.1%} | {peak:.1f} |"
            )
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file, as the stages read")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--batches", type=integers, default=[32, 64, 128], help="prompts a batch, comma-separated")
    parser.add_argument("--lengths", type=integers, default=[1024], help="prompt tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated a prompt in the timed run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/decode-bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (a step is timed between 1 and it), got {args.new_tokens}")
    root = Path(__file__).resolve().parents[1]
    work = args.work.resolve()
    model_dir = work / args.shape
    if args.child:  # in its own process: unsloth patches transformers when imported
        exit_without_collecting()
        print("\n".join(measure(args, model_dir)))
        return 0
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    env = child_environment(root, work)
    ensure(args.shape, model_dir, root, env)
    print(f"{args.shape}, {args.new_tokens} new tokens a prompt, settings of {args.params}", flush=True)
    command = [sys.executable, "-m", "perf.decode_speed", *passed_on(argv, args.params, work), "--child"]
    return subprocess.run(command, check=False, env=env, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
