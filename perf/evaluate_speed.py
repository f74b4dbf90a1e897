"""Benchmark: the evaluate stage on a random-weight model of a real shape, as the real run configures it.

    python -m perf.evaluate_speed [--shape llama-8b] [--rows 500] [--samples 64] [--max-new-tokens 256]

Builds the model (`perf.shapes`), an untrained LoRA adapter with the `lora.*` settings of params.yaml, and
`--rows` held-out conversations with the real data's length mix, tokenizes them (`python -m stages.tokenize`), then
runs `python -m stages.evaluate` as `dvc repro` does. A random model never says EOS, so every answer runs to
`--max-new-tokens`: the slowest case. Prints the stage's wall time (start, imports and 4-bit loading included)
and the evaluation's own time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from perf.data_stages import single_turns

ADAPTER = """
import dataclasses, sys, unsloth
from pathlib import Path
from unsloth import FastLanguageModel
from finetune.config import params
from finetune.model.load import ModelConfig, load_base
from stages.train import LoraConfig
path = Path(sys.argv[1])
model, tokenizer = load_base(params.load(ModelConfig, path, "model"))
model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(params.load(LoraConfig, path, "lora")))
model.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
"""


def held_out(rows: int) -> list[dict[str, list[dict[str, str]]]]:
    """Single-turn conversations as the standardize stage writes them, lengths as in the benchmark data."""
    return [{"conversations": turns} for turns in single_turns(rows, seed=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evaluate-bench"))
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    python = sys.executable

    model = work / args.shape
    if not (model / "config.json").exists():
        subprocess.run([python, "-m", "perf.shapes", args.shape, str(model)], check=True, env=env, cwd=root)
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["model_name"] = str(model)
    params["evaluate"] |= {"max_rows": args.rows, "num_samples": args.samples, "max_new_tokens": args.max_new_tokens}
    params["evaluate"]["benchmarks"] = []
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    subprocess.run([python, "-c", ADAPTER, str(work / "params.yaml"), str(work / "adapter")], check=True, env=env)

    from datasets import Dataset

    (work / "standardized").mkdir(exist_ok=True)
    for split in ("train", "eval"):  # tokenize encodes both splits; evaluate reads the held-out one
        Dataset.from_list(held_out(args.rows)).to_parquet(str(work / "standardized" / f"{split}.parquet"))
    tokenize = [python, "-m", "stages.tokenize", "--params", str(work / "params.yaml"), "--data"]
    tokenize += [str(work / "standardized"), "--out", str(work / "tokenized"), "--metrics", str(work / "tokenize.json")]
    subprocess.run(tokenize, check=True, env=env, cwd=root)

    command = [
        python,
        "-m",
        "stages.evaluate",
        "--params",
        str(work / "params.yaml"),
        "--data",
        str(work / "tokenized"),
        "--texts",
        str(work / "standardized"),
        "--adapter",
        str(work / "adapter"),
        "--metrics",
        str(work / "evaluate.json"),
        "--samples",
        str(work / "samples.json"),
        "--bars",
        str(work / "bars.csv"),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=root)
    wall = time.perf_counter() - start
    metrics = json.loads((work / "evaluate.json").read_text(encoding="utf-8"))

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.shape}, 4-bit, {card}\n")
    print(
        "| held-out rows | tokens scored | answers x max new tokens | mean answer tokens (base / tuned) "
        "| evaluation s | stage wall s | peak GPU GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {metrics['eval_rows']} | {metrics['eval_tokens']:,} | {args.samples} x {args.max_new_tokens} "
        f"| {metrics.get('base_answer_tokens', 0):.0f} / {metrics.get('tuned_answer_tokens', 0):.0f} "
        f"| {metrics['evaluate_seconds']:.1f} | {wall:.1f} | {metrics.get('peak_gpu_memory_gib', 0):.1f} |"
    )


if __name__ == "__main__":
    main()
