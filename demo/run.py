"""Run the whole pipeline offline on the embedded sample and a tiny model, as a DVC experiment.

    python -m demo.run            # what `make demo` runs

It builds the tiny DeepSeek-architecture model and tracks it with DVC (`track`), then runs `dvc exp run --temp`
with the overrides of `demo/params.yaml`: the experiment runs in a temporary copy, so the real run's `params.yaml` and
`dvc.lock` stay untouched, and its metrics appear in `dvc exp show` and its run in the MLflow store. It ends by
printing the comparison of `python -m tools.compare` and the commands to look further.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

OVERRIDES = Path("demo/params.yaml")
SAMPLE = Path("data/sample/finance_instruct_sample.jsonl")
TINY_MODEL = Path("models/tiny-deepseek")


def set_param_flags(overrides: dict[str, dict[str, Any]]) -> list[str]:
    """`dvc exp run` flags for nested overrides: `{"train": {"max_steps": 30}}` -> `['-S', 'train.max_steps=30']`."""
    flags = []
    for section, values in overrides.items():
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            flags += ["-S", f"{section}.{key}={text.removesuffix('...').strip()}"]
    return flags


def apply_overrides(
    params: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """`params` with each overridden key replaced; an override of an unknown section or key is an error."""
    merged = {section: dict(values) for section, values in params.items()}
    for section, values in overrides.items():
        for key, value in values.items():
            if key not in merged.get(section, {}):
                raise KeyError(f"{OVERRIDES}: {section}.{key} is not a key of params.yaml")
            merged[section][key] = value
    return merged


def track(folder: Path) -> None:
    """Track `folder` with DVC and stage its `.dvc` file in git, committing nothing. A DVC experiment, queued or
    `--temp`, runs in a copy of the files git tracks, staged ones included, and DVC checks the folder out of its
    cache there: a sweep (`dvc exp run --queue`, no target stage) finds it without `-C`."""
    subprocess.run(["dvc", "add", "--quiet", str(folder)], check=True)  # the same bytes: the same .dvc file
    subprocess.run(["git", "add", f"{folder}.dvc"], check=True)  # .gitignore already ignores the folder itself


def main() -> None:
    # rebuilt every time (a second): deterministic, and never a stale copy from an older demo/tiny_model.py
    subprocess.run([sys.executable, "-m", "demo.tiny_model", str(SAMPLE), str(TINY_MODEL)], check=True)
    track(TINY_MODEL)
    overrides = yaml.safe_load(OVERRIDES.read_text(encoding="utf-8"))
    apply_overrides(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")), overrides)  # fail fast
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    command = ["dvc", "exp", "run", "--temp", "-n", name, *set_param_flags(overrides)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    print(
        f"\nDemo finished: DVC experiment '{name}'. Its changed settings and key results (python -m tools.compare):\n",
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "tools.compare"], check=False)  # a table, not a result: never fails the demo
    print(
        "\nWhere to look next (after `. .venv/bin/activate`):\n"
        f"  dvc exp apply {name}   # its params, metrics and adapter here (undo: docs/experiments.md)\n"
        "  dvc metrics show                     # every stage's numbers\n"
        f"  dvc plots diff {name}  # loss curves and base-vs-tuned bars: dvc_plots/index.html, drawn offline\n"
        "  make mlflow-ui                       # the MLflow UI, experiment 'finance-deepseek', its fine-tuning view\n"
    )


if __name__ == "__main__":
    main()
