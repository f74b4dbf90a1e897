"""A run's guard: a small process that marks the MLflow run KILLED when the training's process ends without ending it.

A training that raises ends its run FAILED itself. One killed outright (SIGKILL, the out-of-memory killer, `dvc queue
kill --force`) or interrupted while MLflow ends the run (a second Ctrl-C) cannot, and its run would stay RUNNING;
in an experiment's temporary copy no later attempt finds it to mark it. The guard, started before the run, reads a
pipe from the training's process: the run's id once it has one, the word `ended` once the run has ended, and then
the end of the pipe, which the kernel closes however that process ends. Without `ended`, and only then, it opens the
store and marks the run KILLED if it is still RUNNING. It runs in a session of its own, so that a signal to the
training's process group does not reach it, and as a script of the standard library alone (mlflow when it marks).

    python finetune/tracking/guard.py <tracking uri>     # what `guarded` starts; reads the run id and `ended` on stdin
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ENDED = "ended"


@contextlib.contextmanager
def guarded(uri: str) -> Iterator[Callable[[str], None]]:
    """A guard of a run of the store `uri`, for the block: the block gives it the run's id (the function it gets) and
    should end after the run has ended; then the guard is told so, unless the block raised. A guard that failed to
    start or died costs the training nothing."""
    # in / : a queued experiment's copy, the training's folder, is deleted once its training is killed, before the
    # guard opens the store (MLflow reads the working folder to resolve the store's address)
    store = absolute(uri, Path.cwd())
    guard = subprocess.Popen(
        [sys.executable, __file__, store], stdin=subprocess.PIPE, text=True, start_new_session=True, cwd="/"
    )

    def tell(line: str) -> None:
        with contextlib.suppress(OSError):
            guard.stdin.write(f"{line}\n")
            guard.stdin.flush()

    try:
        yield tell
        tell(ENDED)
    finally:
        with contextlib.suppress(OSError):
            guard.stdin.close()


def absolute(uri: str, cwd: Path) -> str:
    """A store's address that holds from any working folder: a SQLite file given relative to `cwd` made absolute,
    any other address as it is (MLflow 3.13+ takes no folder store).

    `absolute("sqlite:///mlflow.db", Path("/repo"))` -> `'sqlite:////repo/mlflow.db'`;
    `absolute("http://mlflow:5000", Path("/repo"))` -> `'http://mlflow:5000'`.
    """
    sqlite = "sqlite:///"
    if uri.startswith(sqlite):
        path = Path(uri.removeprefix(sqlite))
        return uri if path.is_absolute() else f"{sqlite}{cwd / path}"
    return uri


def verdict(told: str) -> tuple[str | None, bool]:
    """`(run id, ended)` from what the training's process wrote: `verdict("ab12\\nended\\n")` -> `('ab12', True)`;
    `verdict("ab12\\n")` -> `('ab12', False)`; `verdict("")` -> `(None, False)`."""
    lines = told.split()
    return (lines[0] if lines else None), ENDED in lines[1:]


def mark_killed(run_id: str, uri: str) -> str:
    """Mark the run KILLED if it is still RUNNING; its status afterwards."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
    return client.get_run(run_id).info.status


def main() -> None:
    run_id, ended = verdict(sys.stdin.read())  # returns when the training's process closes the pipe, or dies
    if run_id is not None and not ended:
        print(f"run guard: the training ended without ending its run {run_id}: {mark_killed(run_id, sys.argv[1])}")


if __name__ == "__main__":
    main()
