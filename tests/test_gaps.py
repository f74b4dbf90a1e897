"""perf.gaps: the GPU's idle time in a profiler trace, put down to the host's innermost phase and to the CUDA
calls that blocked it (what BENCHMARKS.md's profile tables are made of)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from perf.gaps import read, report, summary


def event(cat: str, name: str, start: float, end: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start}


def test_idle_time_is_split_by_the_innermost_phase_and_the_blocking_calls(tmp_path: Path) -> None:
    events = [
        event("kernel", "gemm", 0, 10),
        event("gpu_memcpy", "Memcpy HtoD", 8, 15),  # overlaps the kernel: busy 0-15
        event("kernel", "gemm", 20, 30),
        event("kernel", "gemm", 45, 50),
        event("user_annotation", "ProfilerStep#5", 0, 50),  # the profiler's own step marker counts for nothing
        event("user_annotation", "micro_batch", 0, 40),
        event("user_annotation", "forward", 0, 17),  # idle 15-17 inside it
        event("user_annotation", "log", 35, 45),  # idle 17-20 and 30-35 in micro_batch only, 35-45 in log
        event("cuda_runtime", "cudaStreamSynchronize", 36, 44),
        event("cuda_runtime", "cudaLaunchKernel", 16, 17),  # does not block
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)

    result = summary(read(trace))
    assert (result["window_us"], result["busy_us"], result["gaps"]) == (50, 30, 2)
    assert result["by_phase"] == {"log": 10, "micro_batch": 8, "forward": 2}
    assert result["blocking_calls"] == {"cudaStreamSynchronize": 8}
    assert result["largest"] == [(15, [("log", 10), ("micro_batch", 5)]), (5, [("micro_batch", 3), ("forward", 2)])]
    assert "GPU busy 0.0 ms (60.0%), idle 0.0 ms in 2 gaps" in report(result)


def test_a_trace_without_gpu_work_says_so() -> None:
    assert report(summary([event("cpu_op", "aten::mm", 0, 5)])) == "no GPU activity in the trace"
