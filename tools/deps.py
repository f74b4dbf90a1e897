"""The project files each stage imports, transitively: what its `deps` in `dvc.yaml` must list.

    python -m tools.deps            # every stage's code deps, as dvc.yaml lists them
    python -m tools.deps --check    # exit 1, naming the stage, where dvc.yaml lists other files

An import anywhere in a file counts (inside a function too). Package `__init__.py` files are left out: they hold
a docstring only (a test checks that).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "finetune")  # the project's code a stage can import


def project_imports(root: Path, path: Path) -> set[str]:
    """The project files (`stages/*.py`, `finetune/**/*.py`) the module at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = Path(*name.split(".")).with_suffix(".py")
            if name.startswith(tuple(f"{package}." for package in PACKAGES)) and (root / file).is_file():
                found.add(file.as_posix())
    return found


def imported_files(root: Path, module: str) -> set[str]:
    """`module`'s own file and every project file it imports, transitively."""
    start = Path(*module.split(".")).with_suffix(".py").as_posix()
    seen, todo = set(), [start]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo += project_imports(root, root / file)
    return seen


def stage_definitions(root: Path) -> dict[str, dict]:
    """Every stage of the pipeline and of the optional export pipeline (`export/dvc.yaml`), by name."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return stages | yaml.safe_load((root / "export/dvc.yaml").read_text(encoding="utf-8"))["stages"]


def code_deps(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage: the code files `dvc.yaml` lists, and those its module imports."""
    out = {}
    for name, definition in stage_definitions(root).items():
        module = definition["cmd"].split()[2]  # python -m <module> ...
        listed = sorted(dep for dep in definition["deps"] if dep.endswith(".py"))
        out[name] = (listed, sorted(imported_files(root, module)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail where dvc.yaml lists other files")
    args = parser.parse_args()
    wrong = False
    for stage, (listed, imported) in code_deps(ROOT).items():
        print(f"{stage}:")
        for file in imported:
            print(f"  - {file}")
        if listed != imported:
            wrong = True
            print(
                f"  # dvc.yaml lists more: {sorted(set(listed) - set(imported))}, misses: "
                f"{sorted(set(imported) - set(listed))}",
                file=sys.stderr,
            )
    sys.exit(1 if wrong and args.check else 0)


if __name__ == "__main__":
    main()
