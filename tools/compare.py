"""The experiments side by side, narrow enough to read: changed settings and the key results, one row each.

    python -m tools.compare                     # the workspace, its commit and their experiments (`dvc exp show`)
    python -m tools.compare -A                  # any `dvc exp show` option selects the rows: -A, --rev main, -n 3
    python -m tools.compare --sort tuned_loss   # best first, by any metric of metrics/*.json
    python -m tools.compare --best tuned_loss   # the best experiment: its name, settings and `dvc exp apply <name>`

`dvc exp show --only-changed` prints every changed setting and every metric, well over 100 columns. This table keeps
the settings that tell the experiments apart, the held-out loss of the base and the tuned model, its change,
ROUGE-L of the tuned answers and the training throughput (`RESULTS`). Settings that every experiment shares and
that differ from the commit they ran from (the demo's `demo/params.yaml`, say) are listed once above the table.
A metric is named by its key in its metrics file (`tuned_loss`), or as `metrics/evaluate.json:tuned_loss` where two
files have the key; the best is the lowest for a loss, perplexity, change in %, time or memory (`LOWER_IS_BETTER`),
the highest for anything else (ROUGE-L, accuracy, F1, tokens/s). A revision DVC could not read is left out and
named on stderr with DVC's reason. Not a pipeline stage: changing it reruns nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
# metric keys whose lowest value is the best: losses, perplexities, the loss change in %, times, memory, the share
# of answers with no number to read, of padding, of benchmark items found in the training data
LOWER_IS_BETTER = ("loss", "perplexity", "_pct", "seconds", "runtime", "_gib", "failure_rate", "_share")


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: `{"lora": {"r": 8}}` -> `{"lora.r": 8}` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class Row:
    name: str
    experiment: bool  # an experiment, not a baseline commit or the workspace
    settings: dict[str, Any]  # params.yaml's, dotted
    results: dict[str, Any]  # keyed by `RESULTS`' headers
    metrics: dict[str, float]  # every number of every metrics file, as `key` and as `path:key`


def rows(shown: list[dict[str, Any]]) -> Iterator[Row]:
    """One `Row` per row of `dvc exp show --json`: each baseline, then its experiments, oldest first."""

    def row(name: str, data: Mapping[str, Any], experiment: bool) -> Row:
        settings = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
        files = {path: (value.get("data") or {}) for path, value in (data.get("metrics") or {}).items()}
        results = {
            header: files[path][key]
            for header, path, key, _ in RESULTS
            if isinstance(files.get(path, {}).get(key), int | float)
        }
        numbers = {
            (path, key): float(value)
            for path, values in files.items()
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        metrics = {key: value for (_, key), value in numbers.items()}
        metrics |= {f"{path}:{key}": value for (path, key), value in numbers.items()}
        return Row(name, experiment, settings, results, metrics)

    for baseline in shown:  # a revision DVC could not read (`"data": null`) is left out (`unread`)
        if baseline.get("data") is not None:
            yield row(label(baseline), baseline["data"], False)
        experiments = [rev for rev in experiments_of(baseline) if rev.get("data") is not None]
        for rev in sorted(experiments, key=lambda rev: rev["data"].get("timestamp") or ""):
            yield row(label(rev), rev["data"], True)


def label(rev: Mapping[str, Any]) -> str:
    """A revision's name in the table: `label({"rev": "0123456789abcdef", "name": None})` -> `'0123456'`; the
    workspace's `'workspace'`."""
    return rev.get("name") or (rev["rev"] if rev["rev"] == "workspace" else rev["rev"][:7])


def experiments_of(baseline: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The experiments of a baseline of `dvc exp show --json`, every group's: `experiments_of({"experiments":
    [{"revs": [{"rev": "a"}]}, {"revs": [{"rev": "b"}]}]})` -> `[{"rev": "a"}, {"rev": "b"}]`."""
    return [rev for group in baseline.get("experiments") or [] for rev in group.get("revs") or []]


def unread(shown: list[dict[str, Any]]) -> list[str]:
    """A line for each revision DVC could not read (`"data": null`, its `"error"` saying why), which the table leaves
    out. `unread([{"rev": "0123456789", "data": None, "error": {"msg": "bad YAML", "type": "YAMLError"}}])` ->
    `['0123456: DVC could not read it (bad YAML), left out']`."""
    revs = [rev for baseline in shown for rev in (baseline, *experiments_of(baseline))]
    return [
        f"{label(rev)}: DVC could not read it ({(rev.get('error') or {}).get('msg') or 'no data'}), left out"
        for rev in revs
        if rev.get("data") is None
    ]


def lower_is_better(metric: str) -> bool:
    """Whether the lowest value of `metric` is the best: `tuned_loss` yes, `tuned_rouge_l` and `tokens_per_second`
    no (`LOWER_IS_BETTER`)."""
    return metric.rsplit(":", 1)[-1].endswith(LOWER_IS_BETTER)


def check_metric(metric: str, every_row: list[Row]) -> None:
    """Refuse a metric that no row has, naming those of the results' files there are (where any row has metrics
    yet), or a key that two metrics files hold."""
    files = {path for _, path, _, _ in RESULTS}
    known = sorted(
        {key.rsplit(":", 1)[1] for row in every_row for key in row.metrics if key.rsplit(":", 1)[0] in files}
    )
    if known and not any(metric in row.metrics for row in every_row):
        raise ValueError(
            f"no experiment has the metric {metric!r}; those of {' and '.join(sorted(files))} are: {', '.join(known)}"
            " (any other metrics file's as <file>:<key>)"
        )
    holding = {key.rsplit(":", 1)[0] for row in every_row for key in row.metrics if key.endswith(f":{metric}")}
    if len(holding) > 1:
        raise ValueError(f"{metric!r} is in {' and '.join(sorted(holding))}: name one, as <file>:{metric}")


def ranked(every_row: list[Row], metric: str) -> list[Row]:
    """The rows that have `metric`, best first (`lower_is_better`), then the others in their order."""
    check_metric(metric, every_row)
    sign = 1 if lower_is_better(metric) else -1
    having = sorted((row for row in every_row if metric in row.metrics), key=lambda row: sign * row.metrics[metric])
    return having + [row for row in every_row if metric not in row.metrics]


def differing(every_row: list[Row]) -> list[str]:
    """The settings whose values are not the same in every row."""
    keys = sorted({key for row in every_row for key in row.settings})
    return [key for key in keys if len({text(row.settings.get(key)) for row in every_row}) > 1]


def best(shown: list[dict[str, Any]], metric: str) -> str:
    """The best experiment by `metric`: its name and value, the settings that tell it apart, and the command that
    brings it into the workspace."""
    every_row = list(rows(shown))
    experiments = [row for row in ranked(every_row, metric) if row.experiment and metric in row.metrics]
    if not experiments:
        return f"No experiment has {metric} yet: dvc exp run, or dvc queue start."
    top = experiments[0]
    direction = "lowest" if lower_is_better(metric) else "highest"
    settings = ", ".join(f"{key}={text(top.settings.get(key))}" for key in differing(every_row))
    return "\n".join(
        [
            f"Best of {len(experiments)} experiments by {metric} ({direction}): {top.name}, {metric} = "
            f"{top.metrics[metric]:.6g}",
            f"Its settings: {settings or 'those of its commit'}",
            f"Apply it: dvc exp apply {top.name}",
        ]
    )


def text(value: Any) -> str:
    """A setting or result as a cell: `2.0e-4` -> `'0.0002'`, `None` -> `'null'`, long values cut."""
    shown = "null" if value is None else json.dumps(value) if isinstance(value, list | dict) else str(value)
    return shown if len(shown) <= VALUE_WIDTH else shown[: VALUE_WIDTH - 1] + "…"


def table(shown: list[dict[str, Any]], width: int = WIDTH, sort: str | None = None) -> str:
    """The comparison of `dvc exp show --json`'s output: shared changes above, one line per row below (best first
    by the metric `sort`, which gets a column of its own unless `RESULTS` shows it)."""
    every_row = list(rows(shown))
    if sort is not None:
        every_row = ranked(every_row, sort)
    all_rows = [r for r in every_row if r.experiment or r.results]  # shown: a baseline without results tells nothing
    experiments = [row.settings for row in all_rows if row.experiment]
    differ = differing(every_row)
    # changed in every experiment alike: said once; differing between experiments: a column each
    shared = [key for key in differ if experiments and len({text(s.get(key)) for s in experiments}) == 1]
    columns = [key for key in differ if key not in shared]
    formats = {header: fmt for header, _, _, fmt in RESULTS}
    shown_results = [header for header, *_ in RESULTS]
    in_results = {key for _, _, key, _ in RESULTS} | {f"{path}:{key}" for _, path, key, _ in RESULTS}
    extra = [sort] if sort is not None and sort not in in_results else []
    headers = ["experiment", *columns, *shown_results, *extra]

    def number(row: Row, header: str) -> str:
        if header in extra:
            return f"{row.metrics[header]:.4g}" if header in row.metrics else "-"
        return formats[header].format(row.results[header]) if header in row.results else "-"

    cells = [
        [row.name, *(text(row.settings.get(key)) for key in columns)]
        + [number(row, header) for header in [*shown_results, *extra]]
        for row in all_rows
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
    numeric = set(formats) | set(extra)
    lines.append(
        "  ".join(h.rjust(w) if h in numeric else h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    )
    for line in cells:
        padded = (c.rjust(w) if h in numeric else c.ljust(w) for c, h, w in zip(line, headers, widths, strict=True))
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="other options go to dvc exp show")
    parser.add_argument("--sort", metavar="METRIC", help="rows best first by this metric (tuned_loss, train_loss ...)")
    parser.add_argument(
        "--best", metavar="METRIC", help="print the best experiment by this metric, and how to apply it"
    )
    args, show_options = parser.parse_known_args()
    command = ["dvc", "exp", "show", "--json", *show_options]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    shown = json.loads(result.stdout)
    for line in unread(shown):
        print(line, file=sys.stderr)
    try:
        print(best(shown, args.best) if args.best else table(shown, sort=args.sort))
    except ValueError as error:
        sys.exit(f"python -m tools.compare: {error}")


if __name__ == "__main__":
    main()
