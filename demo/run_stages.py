"""Run dvc.yaml's stage commands in order without DVC, on params.yaml with the demo's overrides.

    python -m demo.run_stages [--set train.optim=adamw_8bit ...] [--until tokenize]

For machines that have the training stack but not DVC, such as the GPU check in BENCHMARKS.md: it overwrites
params.yaml in place, so run it in a scratch copy of the project, never in your checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import yaml

from demo.run import OVERRIDES, apply_overrides


def parse_set(assignment: str) -> tuple[str, str, object]:
    """`"train.optim=adamw_8bit"` -> `("train", "optim", "adamw_8bit")`, the value read as YAML."""
    key, _, value = assignment.partition("=")
    section, _, name = key.partition(".")
    if not name:
        raise ValueError(f"--set needs section.key=value, got {assignment!r}")
    return section, name, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="section.key=value, after the demo's overrides")
    parser.add_argument("--until", help="the last stage to run (default: all of them)")
    args = parser.parse_args()
    stages = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    if args.until is not None and args.until not in stages:
        parser.error(f"--until {args.until}: dvc.yaml has no such stage (it has {', '.join(stages)})")

    overrides = yaml.safe_load(OVERRIDES.read_text(encoding="utf-8"))
    for section, name, value in map(parse_set, args.set):
        overrides.setdefault(section, {})[name] = value
    params = apply_overrides(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")), overrides)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    for name, stage in stages.items():
        start = time.perf_counter()
        subprocess.run(stage["cmd"], shell=True, check=True)
        print(f"stage {name}: {time.perf_counter() - start:.1f} s", flush=True)
        if name == args.until:
            break


if __name__ == "__main__":
    main()
