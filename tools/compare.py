"""The experiments side by side, narrow enough to read: changed settings and the key results, one row each.

    python -m tools.compare          # the workspace, its commit and their experiments (`dvc exp show`'s rows)
    python -m tools.compare -A       # any `dvc exp show` option selects the rows: -A, --rev main, -n 3 ...

`dvc exp show --only-changed` prints every changed setting and every metric, well over 100 columns. This table keeps
the settings that tell the experiments apart, the held-out loss of the base and the tuned model, its change,
ROUGE-L of the tuned answers and the training throughput (`RESULTS`). Settings that every experiment shares and
that differ from the commit they ran from (the demo's `demo/params.yaml`, say) are listed once above the table.
Not a pipeline stage: changing it reruns nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

WIDTH = 160  # the terminal the table must fit
# (header, metrics file, key, format) of the results shown, in order
RESULTS = (
    ("base loss", "metrics/evaluate.json", "base_loss", "{:.4f}"),
    ("tuned loss", "metrics/evaluate.json", "tuned_loss", "{:.4f}"),
    ("change", "metrics/evaluate.json", "loss_change_pct", "{:+.1f} %"),
    ("ROUGE-L", "metrics/evaluate.json", "tuned_rouge_l", "{:.3f}"),
    ("tokens/s", "metrics/train.json", "tokens_per_second", "{:,.0f}"),
)
VALUE_WIDTH = 28  # a longer setting (a list of benchmarks, say) is cut to this many characters


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: `{"lora": {"r": 8}}` -> `{"lora.r": 8}` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rows(shown: list[dict[str, Any]]) -> Iterator[tuple[str, bool, dict[str, Any], dict[str, Any]]]:
    """`(name, is_experiment, settings, results)` per row of `dvc exp show --json`: each baseline, then its
    experiments, oldest first. Settings are params.yaml's, dotted; results keyed by `RESULTS`' headers."""

    def row(name: str, data: Mapping[str, Any], experiment: bool) -> tuple[str, bool, dict[str, Any], dict[str, Any]]:
        settings = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
        metrics = {path: (value.get("data") or {}) for path, value in (data.get("metrics") or {}).items()}
        results = {
            header: metrics[path][key]
            for header, path, key, _ in RESULTS
            if isinstance(metrics.get(path, {}).get(key), int | float)
        }
        return name, experiment, settings, results

    for baseline in shown:
        yield row(baseline.get("name") or baseline["rev"][:7], baseline["data"], False)
        experiments = [rev for group in baseline.get("experiments") or [] for rev in group["revs"]]
        for rev in sorted(experiments, key=lambda rev: rev["data"].get("timestamp") or ""):
            yield row(rev.get("name") or rev["rev"][:7], rev["data"], True)


def text(value: Any) -> str:
    """A setting or result as a cell: `2.0e-4` -> `'0.0002'`, `None` -> `'null'`, long values cut."""
    shown = "null" if value is None else json.dumps(value) if isinstance(value, list | dict) else str(value)
    return shown if len(shown) <= VALUE_WIDTH else shown[: VALUE_WIDTH - 1] + "…"


def table(shown: list[dict[str, Any]], width: int = WIDTH) -> str:
    """The comparison of `dvc exp show --json`'s output: shared changes above, one line per row below."""
    every_row = list(rows(shown))
    all_rows = [r for r in every_row if r[1] or r[3]]  # shown: a baseline without results tells nothing
    experiments = [settings for _, is_experiment, settings, _ in all_rows if is_experiment]
    keys = sorted({key for _, _, settings, _ in every_row for key in settings})
    differ = [key for key in keys if len({text(s.get(key)) for _, _, s, _ in every_row}) > 1]
    # changed in every experiment alike: said once; differing between experiments: a column each
    shared = [key for key in differ if experiments and len({text(s.get(key)) for s in experiments}) == 1]
    columns = [key for key in differ if key not in shared]
    headers = ["experiment", *columns, *(header for header, *_ in RESULTS)]
    formats = {header: fmt for header, _, _, fmt in RESULTS}
    cells = [
        [name, *(text(settings.get(key)) for key in columns)]
        + [formats[header].format(results[header]) if header in results else "-" for header, *_ in RESULTS]
        for name, _, settings, results in all_rows
    ]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    while sum(widths) + 2 * (len(widths) - 1) > width and len(columns) > 0:  # too wide: the last setting goes
        dropped = columns.pop()
        index = headers.index(dropped)
        shared.append(dropped)
        for line in [headers, widths, *cells]:
            del line[index]
    lines = []
    if shared and experiments:
        changes = ", ".join(f"{key}={text(experiments[-1].get(key))}" for key in shared)
        lines += textwrap.wrap(f"Changed settings (as in the last experiment): {changes}", width)
    if not all_rows:
        return "\n".join([*lines, "No experiment with results yet: dvc exp run, or make demo."])
    numeric = set(formats)
    lines.append(
        "  ".join(h.rjust(w) if h in numeric else h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    )
    for line in cells:
        padded = (c.rjust(w) if h in numeric else c.ljust(w) for c, h, w in zip(line, headers, widths, strict=True))
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def main() -> None:
    command = ["dvc", "exp", "show", "--json", *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    print(table(json.loads(result.stdout)))


if __name__ == "__main__":
    main()
