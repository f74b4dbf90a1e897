"""Benchmark: a LoRA adapter's product with a full-size output, each way a training step can run it.

    python -m perf.lora_products [--shape llama-8b] [--tokens 24000] [--ranks 4,16] [--repeat 20]

A step with LoRA on a projection runs, besides the frozen product X W^T, a product of rank r (the adapter's inner
size) whose output is as large as the projection's: (X A^T) B^T forward, (dY B) A into dX backward. For every output
width of a decoder layer of `--shape` (`perf.shapes.SHAPES`: the k/v heads', the hidden size, the MLP's) and each
rank, on `--tokens` rows in bf16, this times (median of `--repeat` after as many untimed; CUDA events on a GPU, the
wall clock on the CPU, for a smoke run):
- `mm`: Z B^T into a new tensor (what peft's layer runs, then adds it to Y);
- `addmm_`: Y += s Z B^T in place (unsloth's fused LoRA forward and backward);
- `addmm_ K32`, `addmm_ K64`: the same with the inner size zero-padded to 32 and 64: the same sums up to the order
  of rounding (the pad adds zeros), for other kernels that cuBLAS may choose;
- `Y + s mm`: what peft's layer computes, compiled by `torch.compile` (CUDA only);
- `add_`: Y += s Y2, two full-size tensors: the memory traffic of `addmm_` without its product, for reference.
Prints a table: milliseconds each, and for `addmm_` the bandwidth of Y read and written (GB/s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from perf.shapes import SHAPES, integers


def timed(run: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of `run` over `repeat` calls, after `repeat` untimed ones."""
    import torch

    cuda = torch.cuda.is_available()
    times = []
    for index in range(2 * repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - began) * 1000
        if index >= repeat:
            times.append(elapsed)
    return statistics.median(times)


def padded(tensor: Any, inner: int) -> Any:
    """`tensor` (rows × r) with zero columns up to `inner`."""
    import torch

    return torch.nn.functional.pad(tensor, (0, inner - tensor.shape[1]))


def row(tokens: int, width: int, rank: int, repeat: int) -> list[float]:
    """Milliseconds of each way (the module's docstring, in its order) for an output of `tokens` × `width`."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    draw = torch.Generator(device).manual_seed(0)
    y, y2 = (torch.randn(tokens, width, device=device, dtype=torch.bfloat16, generator=draw) for _ in range(2))
    z = torch.randn(tokens, rank, device=device, dtype=torch.bfloat16, generator=draw)
    b = torch.randn(width, rank, device=device, dtype=torch.bfloat16, generator=draw)
    scale = 16 / rank
    times = [timed(lambda: z @ b.t(), repeat), timed(lambda: y.addmm_(z, b.t(), alpha=scale), repeat)]
    for inner in (32, 64):  # no column for a rank not below it
        z_pad, b_pad = padded(z, inner), padded(b, inner)
        run = lambda z_pad=z_pad, b_pad=b_pad: y.addmm_(z_pad, b_pad.t(), alpha=scale)  # noqa: E731
        times.append(timed(run, repeat) if inner > rank else float("nan"))
    if device == "cuda":
        peft = torch.compile(lambda y, z, b: y + (z @ b.t()) * scale)
        times.append(timed(lambda: peft(y, z, b), repeat))
    else:
        times.append(float("nan"))
    times.append(timed(lambda: y.add_(y2, alpha=scale), repeat))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=24000, help="rows of the product: a pass's tokens")
    parser.add_argument("--ranks", type=integers, default=[4, 16], help="comma-separated LoRA ranks")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls of each, after as many untimed")
    args = parser.parse_args(argv)
    import torch

    shape = SHAPES[args.shape]
    head = shape["hidden_size"] // shape["num_attention_heads"]
    widths = sorted({shape["num_key_value_heads"] * head, shape["hidden_size"], shape["intermediate_size"]})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.shape}: output widths {widths}, {args.tokens} rows, bf16, {device}, median of {args.repeat}\n")
    ways = ["mm", "addmm_", "addmm_ K32", "addmm_ K64", "Y + s mm compiled", "add_"]
    print("| width | rank | " + " | ".join(f"{way} ms" for way in ways) + " | addmm_ GB/s |")
    print("|---" * (len(ways) + 3) + "|")
    for width in widths:
        for rank in args.ranks:
            times = row(args.tokens, width, rank, args.repeat)
            bandwidth = 2 * 2 * args.tokens * width / (times[1] / 1000) / 1e9  # Y read and written, 2 bytes each
            cells = " | ".join("-" if value != value else f"{value:.3f}" for value in times)
            print(f"| {width} | {rank} | {cells} | {bandwidth:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
