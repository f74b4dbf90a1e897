"""Where the GPU waits: the idle gaps of a `torch.profiler` chrome trace, put down to what the host was doing.

    python -m perf.gaps TRACE.json[.gz]

The GPU is busy while any kernel, copy or fill runs on it. Each idle stretch is split among the host's innermost
phase markers (`record_function` names, the benchmark's `profiled` sets them around the Trainer's parts) and the
CUDA calls that block the host (synchronisations, copies to the host) that overlap it.
"""

from __future__ import annotations

import bisect
import gzip
import json
import math
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def read(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping (start, end) spans joined: `[(0, 2), (1, 3), (5, 6)]` -> `[(0, 3), (5, 6)]`."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def idle(busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches between the busy spans (merged, sorted)."""
    return [(a[1], b[0]) for a, b in pairwise(busy) if b[0] > a[1]]


def overlap(span: tuple[float, float], other: tuple[float, float]) -> float:
    return max(0.0, min(span[1], other[1]) - max(span[0], other[0]))


def within(gaps: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The gaps (disjoint, sorted) that overlap [start, end]."""
    first = max(0, bisect.bisect_right(gaps, (start, math.inf)) - 1)
    last = bisect.bisect_left(gaps, (end, -math.inf))
    return [gap for gap in gaps[first:last] if overlap(gap, (start, end)) > 0]


def innermost(markers: list[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """How much of [start, end] each innermost marker covers (markers nest; a later-starting, shorter one inside
    another wins); what no marker covers is `(none)`."""
    covered: dict[str, float] = defaultdict(float)
    cuts = sorted({start, end, *(t for s, e, _ in markers for t in (s, e) if start < t < end)})
    for a, b in pairwise(cuts):
        mid = (a + b) / 2
        inside = [(e - s, name) for s, e, name in markers if s <= mid <= e]
        covered[min(inside)[1] if inside else "(none)"] += b - a
    return covered


def summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The window, the GPU's busy and idle time, and the idle time by host phase and by blocking CUDA call (µs)."""
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE and e.get("ph") == "X"]
    busy = merged(spans)
    if not busy:
        return {}
    window = (busy[0][0], busy[-1][1])
    markers = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e.get("ph") == "X" and not e["name"].startswith("ProfilerStep")
    ]
    blocking = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "cuda_runtime" and e.get("name") in BLOCKING
    ]
    gaps = idle(busy)
    in_gap: dict[tuple[float, float], list[tuple[float, float, str]]] = defaultdict(list)
    for marker in markers:
        for gap in within(gaps, marker[0], marker[1]):
            in_gap[gap].append(marker)
    by_phase: dict[str, float] = defaultdict(float)
    for start, end in gaps:
        for name, time in innermost(in_gap[(start, end)], start, end).items():
            by_phase[name] += time
    by_call: dict[str, float] = defaultdict(float)
    for s, e, name in blocking:
        by_call[name] += sum(overlap(gap, (s, e)) for gap in within(gaps, s, e))
    largest = sorted(gaps, key=lambda g: g[0] - g[1])[:15]
    return {
        "window_us": window[1] - window[0],
        "busy_us": sum(e - s for s, e in busy),
        "gaps": len(gaps),
        "by_phase": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
        "blocking_calls": dict(sorted(by_call.items(), key=lambda kv: -kv[1])),
        "largest": [
            (round(e - s), sorted(innermost(in_gap[(s, e)], s, e).items(), key=lambda kv: -kv[1])[:2])
            for s, e in largest
        ],
    }


def report(result: dict[str, Any]) -> str:
    if not result:
        return "no GPU activity in the trace"
    window, busy = result["window_us"], result["busy_us"]
    lines = [
        f"window {window / 1e3:,.1f} ms, GPU busy {busy / 1e3:,.1f} ms ({busy / window:.1%}), "
        f"idle {(window - busy) / 1e3:,.1f} ms in {result['gaps']:,} gaps",
        "| idle while the host was in | ms | share of window |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {t / 1e3:,.1f} | {t / window:.1%} |" for name, t in result["by_phase"].items() if t > 100]
    lines += ["| blocking CUDA call during idle | ms | |", "|---|---|---|"]
    lines += [f"| {name} | {t / 1e3:,.1f} | {t / window:.1%} |" for name, t in result["blocking_calls"].items()]
    lines.append("largest gaps (µs, phases): " + "; ".join(f"{us} {phases}" for us, phases in result["largest"]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(summary(read(Path(sys.argv[1])))))
