"""The table `perf.train_speed` prints: one row per setup and number of processes (the median of its repeats), under a
header of the settings the runs report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from perf.shapes import described

PEAK_FLOPS = 790e12  # bf16 dense matmul rate measured on this workplace's H100/H200 (the datasheet says 989)


def matmul_parameters(model_dir: Path) -> float:
    """Parameters that every token multiplies through (all linear layers and the output layer)."""
    from types import SimpleNamespace

    from finetune.model.fit import Shape

    shape = Shape.of(SimpleNamespace(**json.loads((model_dir / "config.json").read_text())))
    return shape.linear_parameters + shape.hidden * shape.vocab


def combined(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every process's result: tokens/s summed (the steps are synchronised, so the timed windows
    match), padding share averaged, the largest peak memory, time, step and allocator retries, rank 0's settings."""
    return ranks[0] | {
        "tokens_per_s": sum(r["tokens_per_s"] for r in ranks),
        "padding_share": sum(r["padding_share"] for r in ranks) / len(ranks),
        "peak_gib": max(r["peak_gib"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "slowest_step_s": max(r["slowest_step_s"] for r in ranks),
        "median_step_s": max(r["median_step_s"] for r in ranks),
        "reserved_gib": max(r["reserved_gib"] for r in ranks),
        "alloc_retries": max(r["alloc_retries"] for r in ranks),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one setup (each a fresh process), the one of median tokens/s (the lower middle of an even
    count), with every run's tokens/s beside it."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2] | {"each": [run["tokens_per_s"] for run in runs]}


def loss_gap(losses: list[float], reference: list[float]) -> float:
    """The largest relative difference between two loss curves, step by step (NaN if their lengths differ)."""
    if len(losses) != len(reference) or not losses:
        return float("nan")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def lora_text(lora: dict[str, Any]) -> str:
    """A LoRA as a run reports it (`lora_ran`), for the header.

    `{"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"], "rslora": False}`
    -> `"LoRA r 8, alpha 16, dropout 0.0 on q_proj/v_proj"`.
    """
    text = f"LoRA r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']} on {'/'.join(lora['targets'])}"
    return text + (", rsLoRA" if lora["rslora"] else "")


def header(shape: str, model_dir: Path, rows: list[tuple[str, int, dict[str, Any]]], args: argparse.Namespace) -> str:
    """The table's title: the shape, and the sequence length and LoRA the runs report (each setup's own where they
    differ), the batch, steps and lengths, the machine."""
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    ran = {json.dumps({"max_seq_length": r["max_seq_length"], "lora": r["lora"]}, sort_keys=True) for _, _, r in rows}
    if len(ran) == 1:
        one = json.loads(next(iter(ran)))
        settings = f"max_seq_length {one['max_seq_length']}, {lora_text(one['lora'])}"
    else:
        settings = "; ".join(
            f"{setup}: max_seq_length {r['max_seq_length']}, {lora_text(r['lora'])}" for setup, _, r in rows
        )
    return (
        f"{shape} ({described(model_dir)}), {settings}, batch {args.batch} conversations per step, {args.steps} steps "
        f"({args.warmup} untimed), {args.lengths} lengths, settings of {args.params}, {card}"
    )


def bare_rates(rows: list[tuple[str, int, dict[str, Any]]]) -> dict[str, float]:
    """The bare library loop's tokens/s by the LoRA it carried (as JSON), the mean of its rows (`bare,project,bare`
    gives two): what each row of that LoRA is compared with in the same call."""
    rates: dict[str, list[float]] = {}
    for setup, _, r in rows:
        if setup.split(" ")[0] == "bare":
            rates.setdefault(json.dumps(r["lora"], sort_keys=True), []).append(r["tokens_per_s"])
    return {lora: sum(each) / len(each) for lora, each in rates.items()}


def table(rows: list[tuple[str, int, dict[str, Any]]], args: argparse.Namespace, flops_per_token: float) -> list[str]:
    """One line per setup and number of processes, the median of its repeats; `× bare`: over the mean of the bare
    loop's rows with the same LoRA, where the call ran it."""
    import torch

    lines = [
        f"| setup | processes | settings | effective tokens/s (median of {args.repeat}) | each run | × 1 process "
        "| × bare | padding share | MFU per GPU | peak GiB (allocated / reserved) | timed s | slowest / median step s "
        "| allocator retries | loss vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bare = bare_rates(rows)
    for setup, count, r in rows:
        single = next((one for name, n, one in rows if name == setup and n == 1), None)
        mfu = f"{r['tokens_per_s'] * flops_per_token / PEAK_FLOPS / count:.1%}" if torch.cuda.is_available() else "-"
        described_settings = ", ".join(f"{key} {value}" for key, value in r["settings"].items())
        speedup = f"{r['tokens_per_s'] / single['tokens_per_s']:.2f}×" if single and count > 1 else ""
        apart = f"{loss_gap(r['losses'], single['losses']):.2%}" if single and count > 1 else ""
        each = " ".join(f"{tokens:,.0f}" for tokens in r["each"])
        reference = bare.get(json.dumps(r["lora"], sort_keys=True))
        over_bare = f"{r['tokens_per_s'] / reference:.3f}×" if reference else ""
        lines.append(
            f"| {setup} | {count} | {described_settings} | {r['tokens_per_s']:,.0f} | {each} | {speedup} "
            f"| {over_bare} | {r['padding_share']:.1%} | {mfu} | {r['peak_gib']:.1f} / {r['reserved_gib']:.1f} "
            f"| {r['seconds']:.1f} | {r['slowest_step_s']:.2f} / {r['median_step_s']:.2f} | {r['alloc_retries']} "
            f"| {apart} |"
        )
    return lines
