"""Benchmark: the evaluate stage on a random-weight model of a real shape, as the real run configures it.

    python -m perf.evaluate_speed [--params params.yaml] [--shape llama-8b] [--rows 500] [--samples 64]
        [--max-new-tokens 256] [--benchmark-items real|N] [--work /tmp/evaluate-bench]

Builds the model (`perf.shapes`), an untrained LoRA adapter with the `model` and `lora` settings of `--params`, and
`--rows` held-out conversations with the real data's length mix (`perf.data_stages`); writes a local stand-in of
each benchmark of `benchmarks.sets` in its Hub schema (`perf.stand_ins`: columns, split, label values or numeric
answers, `data_dir`), of its real size (`--benchmark-items real`: FPB 4,846 items, FiQA-SA 234, TFNS 2,388, FinQA
1,147 questions of ~1,000 tokens in FLARE's layout: context, table, question) or of N items; then runs the tokenize,
benchmarks and evaluate stages as `dvc repro` does (`python -m stages.<name>`, each its own process), with
`--params`' settings but the model, the stand-ins and the sizes given here (`--samples`, `--max-new-tokens`: default
`evaluate.num_samples`, `evaluate.max_new_tokens`; a numeric benchmark generates up to `benchmarks.max_new_tokens`).
A random model never says EOS, so every answer runs to its `max_new_tokens`: the slowest case. Prints the settings
the stages ran (read back from the settings file they read, the adapter's config and precision) and a table: the
evaluate stage's wall time (start, imports and loading included), the evaluation's own time (`evaluate_seconds`),
the rows, samples and benchmark items scored, the tokens generated per numeric benchmark item, the peak GPU memory
where there is a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.config.cli import exit_without_collecting
from finetune.config.params import load
from finetune.evaluation.base_vs_tuned import EvaluateConfig
from finetune.evaluation.benchmark_sets import BenchmarkConfig, BenchmarksConfig
from finetune.model.load import PRECISION_FILE
from perf.data_stages import single_turns
from perf.shapes import child_environment, described, ensure
from perf.stand_ins import benchmark_items, finqa_scale, stand_in


def held_out(rows: int) -> list[dict[str, list[dict[str, str]]]]:
    """Single-turn conversations as the standardize stage writes them, lengths as in the benchmark data."""
    return [{"conversations": turns} for turns in single_turns(rows, seed=1)]


def settings_file(
    params: dict[str, Any],
    model: Path,
    benchmarks: Path,
    evaluate: dict[str, int | None],
    sizes: str,
    scale: float = 1.0,
) -> tuple[dict[str, Any], dict[str, int]]:
    """`params` with the shape's folder as the model, the `evaluate` settings given (None: as they are), each
    benchmark a local stand-in written to `benchmarks` of `sizes` items (`--benchmark-items`; numeric questions'
    texts scaled by `scale`); and the items written per benchmark."""
    params = json.loads(json.dumps(params))  # a copy
    params["model"] |= {"model_name": str(model), "revision": None}
    params["evaluate"] |= {key: value for key, value in evaluate.items() if value is not None}
    sets, items = [], {}
    for i, (raw, bench) in enumerate(zip(params["benchmarks"]["sets"], load_sets(params), strict=True)):
        items[bench.name] = benchmark_items(sizes, bench.name)
        stand_in(bench, benchmarks / bench.name, items[bench.name], 1000 + i, scale)  # not the held-out texts' seed
        # a local folder: no Hub revision or config; the preset's data_dir and split are kept, as written
        sets.append({**raw, "dataset": str(benchmarks / bench.name), "revision": None, "config": None})
    params["benchmarks"]["sets"] = sets
    return params, items


def load_sets(params: dict[str, Any]) -> list[BenchmarkConfig]:
    """The benchmarks of a params mapping's `benchmarks` section, resolved (presets and their overrides)."""
    return BenchmarksConfig(**params["benchmarks"]).sets


def make_adapter(params_path: Path, out: Path) -> None:
    """An untrained adapter as train saves one: the base as `model.*` loads it (`auto` decided for this machine),
    the LoRA of `lora.*`, the tokenizer and the base's precision."""
    import unsloth  # noqa: F401, I001  # isort: skip
    from unsloth import FastLanguageModel

    from finetune.model import fit
    from finetune.model.load import ModelConfig, load_base
    from finetune.training.adapter import save_adapter
    from finetune.training.config import LoraConfig

    model_config = fit.resolved(load(ModelConfig, params_path, "model"))
    model, tokenizer = load_base(model_config)
    # checkpointing changes no weight of an untrained adapter, and `auto` is train's to decide
    lora = dataclasses.replace(load(LoraConfig, params_path, "lora"), use_gradient_checkpointing=False)
    model = FastLanguageModel.get_peft_model(model, **dataclasses.asdict(lora))
    save_adapter(model, tokenizer, out, model_config)


def stage(name: str, params: Path, paths: dict[str, Path], env: dict[str, str], root: Path) -> float:
    """Run `python -m stages.<name> --params ... --<path> ...` as dvc.yaml runs it; its wall seconds."""
    command = [sys.executable, "-m", f"stages.{name}", "--params", str(params)]
    for flag, path in paths.items():
        command += [f"--{flag}", str(path)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=root)
    return time.perf_counter() - start


def header(shape: str, work: Path, args: argparse.Namespace) -> str:
    """What the stages ran: the shape, the base's precision and the LoRA as the adapter records them, the
    `model`, `evaluate` and `benchmarks` settings of the file the stages read, the machine."""
    import torch

    from finetune.model.load import ModelConfig
    from finetune.model.patches import decode_graphs_wanted

    adapter = json.loads((work / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    four_bit = json.loads((work / "adapter" / PRECISION_FILE).read_text(encoding="utf-8"))["load_in_4bit"]
    model = load(ModelConfig, work / "params.yaml", "model")
    evaluate = load(EvaluateConfig, work / "params.yaml", "evaluate")
    benchmarks = load(BenchmarksConfig, work / "params.yaml", "benchmarks")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lora = f"LoRA r {adapter['r']}, alpha {adapter['lora_alpha']} on {'/'.join(sorted(adapter['target_modules']))}"
    base = f"base in {'4-bit' if four_bit else '16-bit'}, dtype {model.dtype or 'auto'}"
    return (
        f"{shape} ({described(work / shape)}), {base}, max_seq_length {model.max_seq_length}, {lora}; evaluate: "
        f"max_rows {evaluate.max_rows}, batch_tokens {evaluate.batch_tokens}, {evaluate.num_samples} samples x "
        f"max_new_tokens {evaluate.max_new_tokens}, generate_batch_size {evaluate.generate_batch_size}, "
        f"benchmark_batch_tokens {evaluate.benchmark_batch_tokens}; benchmarks ngram {benchmarks.ngram}, "
        f"max_new_tokens {benchmarks.max_new_tokens}; decode steps as CUDA graphs: "
        f"{'on' if decode_graphs_wanted() else 'off'}; settings of {args.params}; {card}"
    )


def table(metrics: dict[str, Any], names: list[str], walls: dict[str, float]) -> list[str]:
    """The evaluation's numbers: what was scored, the time, the memory."""
    peak = metrics.get("peak_gpu_memory_gib")
    columns = [
        ("held-out rows", f"{metrics['eval_rows']}"),
        ("tokens scored", f"{metrics['eval_tokens']:,}"),
        ("samples answered", f"{metrics['generated_samples']}"),
        (
            "mean answer tokens (base / tuned)",
            f"{metrics.get('base_answer_tokens', 0):.0f} / {metrics.get('tuned_answer_tokens', 0):.0f}",
        ),
        *((f"{name} items", f"{metrics[f'{name}_rows']:,}") for name in names),
        *(  # a numeric benchmark's decode steps per item: the tokens generated, not the decoded text's (a random
            # model's ids outside the stand-in tokenizer's vocabulary decode to nothing)
            (
                f"{name} tokens generated an item (base / tuned)",
                f"{metrics[f'{name}_base_generated_tokens']:.0f} / {metrics[f'{name}_tuned_generated_tokens']:.0f}",
            )
            for name in names
            if f"{name}_tuned_generated_tokens" in metrics
        ),
        ("benchmarks stage wall s", f"{walls['benchmarks']:.1f}"),
        ("evaluation s", f"{metrics['evaluate_seconds']:.1f}"),
        ("evaluate stage wall s", f"{walls['evaluate']:.1f}"),
        ("peak GPU GiB", f"{peak:.1f}" if peak is not None else "-"),
    ]
    return [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
        "| " + " | ".join(value for _, value in columns) + " |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file, as the stages read")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--rows", type=int, default=500, help="held-out conversations written (evaluate.max_rows caps)")
    parser.add_argument("--samples", type=int, help="evaluate.num_samples; default: --params'")
    parser.add_argument("--max-new-tokens", type=int, help="evaluate.max_new_tokens; default: --params'")
    parser.add_argument(
        "--benchmark-items", default="real", help="items of each benchmark: real (their published sizes) or a number"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/evaluate-bench"))
    parser.add_argument("--make-adapter", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: PARAMS OUT
    args = parser.parse_args(argv)
    if args.make_adapter:  # in its own process: unsloth patches transformers when imported
        exit_without_collecting()
        make_adapter(*args.make_adapter)
        return
    if args.benchmark_items != "real" and not (args.benchmark_items.isdigit() and int(args.benchmark_items) >= 1):
        parser.error(f"--benchmark-items must be real or a number >= 1, got {args.benchmark_items!r}")
    root = Path(__file__).resolve().parents[1]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = child_environment(root, work)

    # --- inputs: the model, the settings the stages read, the adapter, the held-out conversations, the benchmarks
    model = work / args.shape
    ensure(args.shape, model, root, env)
    evaluate = {"num_samples": args.samples, "max_new_tokens": args.max_new_tokens}
    written = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    from transformers import AutoTokenizer

    scale = finqa_scale(AutoTokenizer.from_pretrained(model))
    params, items = settings_file(written, model, work / "benchmarks", evaluate, args.benchmark_items, scale)
    settings = work / "params.yaml"
    settings.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    print(f"benchmark stand-ins: {items} -> {work / 'benchmarks'}, FinQA texts x {scale:.2f}", flush=True)
    adapter = [sys.executable, "-m", "perf.evaluate_speed", "--make-adapter", str(settings), str(work / "adapter")]
    subprocess.run(adapter, check=True, env=env, cwd=root)
    from datasets import Dataset

    (work / "standardized").mkdir(exist_ok=True)
    for split in ("train", "eval"):  # tokenize encodes both splits, benchmarks searches train, evaluate reads eval
        Dataset.from_list(held_out(args.rows)).to_parquet(str(work / "standardized" / f"{split}.parquet"))

    # --- the stages, as dvc.yaml runs them (their paths in `work`)
    texts = work / "standardized"
    tokenize = {"data": texts, "out": work / "tokenized", "metrics": work / "tokenize.json"}
    items_out = {"out": work / "benchmark_items", "metrics": work / "benchmarks.json"}
    benchmarks = {"sources": work / "benchmarks", "texts": texts, **items_out}
    scored = {
        "data": work / "tokenized",
        "texts": texts,
        "benchmarks": work / "benchmark_items",
        "adapter": work / "adapter",
        "metrics": work / "evaluate.json",
        "samples": work / "samples.json",
        "bars": work / "bars.csv",
    }
    stage("tokenize", settings, tokenize, env, root)
    walls = {"benchmarks": stage("benchmarks", settings, benchmarks, env, root)}
    walls["evaluate"] = stage("evaluate", settings, scored, env, root)

    # --- the table
    metrics = json.loads((work / "evaluate.json").read_text(encoding="utf-8"))
    print(f"\n{header(args.shape, work, args)}\n")
    print("\n".join(table(metrics, [bench.name for bench in load_sets(params)], walls)))


if __name__ == "__main__":
    main()
