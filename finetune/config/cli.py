"""A stage's command line: its paths as required arguments, `--params` for the settings file, logging set up once.

    if __name__ == "__main__":
        main(**cli.arguments(__doc__, data="folder of the raw splits", out="...", metrics="..."))

Paths come from `dvc.yaml` (which owns them); settings come from `params.yaml`, never from a flag.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import linecache
import logging
import os
import sys
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO and up to stderr, one line each. `force`: a library imported first (unsloth) may have configured the
    root logger already, which would leave this one silent."""
    logging.basicConfig(level=logging.INFO, format=FORMAT, force=True)


ROOT = Path(__file__).resolve().parents[2]  # the project: its own code is under finetune/, stages/ and tools/
OWN = tuple(str(ROOT / folder) + "/" for folder in ("finetune", "stages", "tools"))


def brief_errors(name: str) -> None:
    """Print a bad setting or input as the one line `<name>: error: <message>`, not a traceback: a `ValueError` or
    `FileNotFoundError` that a `raise` statement of this project's own code raised (its message names the key, the
    row or the file). Any other error keeps its traceback, one that Python or a library raised inside our code (a
    bug: `int("0,1")`, an unpacking) too, and `FINETUNE_TRACEBACK=1` in the environment shows every one."""
    default = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        last = trace
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        ours = last is not None and last.tb_frame.f_code.co_filename.startswith(OWN)
        ours = ours and linecache.getline(last.tb_frame.f_code.co_filename, last.tb_lineno).lstrip().startswith("raise")
        if issubclass(kind, ValueError | FileNotFoundError) and ours and not os.environ.get("FINETUNE_TRACEBACK"):
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        else:
            default(kind, error, trace)

    sys.excepthook = hook


def exit_without_collecting() -> None:
    """At this process's exit, skip the interpreter's final garbage collections. With torch, transformers and
    unsloth loaded, finalizing the modules walks millions of objects several times: ~3 s of CPU after a stage's last
    line, a sixth of a demo stage, with nothing to free that the process's end does not. The rest of a normal exit
    still runs (the atexit handlers, MLflow's and logging's; objects freed by reference count): only garbage caught in
    reference cycles is left to the operating system."""
    atexit.register(gc.freeze)  # registered after the imports' handlers: it runs before them, which is harmless


def parser(doc: str, many: tuple[str, ...] = (), **paths: str) -> argparse.ArgumentParser:
    """`--params` and one required path option per keyword (`out_dir` -> `--out-dir`), its value the help text;
    the names in `many` take one or more paths."""
    built = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    built.add_argument("--params", dest="params_path", type=Path, default=Path("params.yaml"), help="settings file")
    for name, help_text in paths.items():
        flag = "--" + name.replace("_", "-")
        built.add_argument(flag, type=Path, required=True, nargs="+" if name in many else None, help=help_text)
    return built


def arguments(doc: str, many: tuple[str, ...] = (), **paths: str) -> dict[str, Any]:
    """Parse this process's arguments with `parser`, set up logging, one-line errors (`brief_errors`), the Python
    stack of every thread printed on a crash (`faulthandler`: a segfault in a native library says where it came
    from) and a quick exit (`exit_without_collecting`):
    the keyword arguments of the stage's `main` (`params_path`, then each path; a `many` path as a tuple)."""
    parsed = vars(parser(doc, many, **paths).parse_args())
    faulthandler.enable()
    setup_logging()
    brief_errors(doc.strip().split(":", 1)[0])  # the stage's name: its docstring's first word
    exit_without_collecting()
    return {key: tuple(value) if isinstance(value, list) else value for key, value in parsed.items()}
