"""gpu/long.sh, which carries a measurement over several device calls: it runs on any machine, so it is tested here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "long.sh"


def long_sh(*args: str, runs: Path, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LONG_RUNS": str(runs)} | ({"OUT": str(out)} if out else {})
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False)


def test_a_run_outlives_its_call_and_a_later_wait_collects_it(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    code = "import time; print('first', flush=True); time.sleep(3); print('second')"
    started = long_sh("start", "slow", "python3", "-c", code, runs=runs)
    assert started.returncode == 0 and "started slow" in started.stdout
    waiting = long_sh("wait", "slow", "0", runs=runs)
    assert waiting.returncode == 3 and "still running" in waiting.stdout
    ended = long_sh("wait", "slow", "60", runs=runs, out=out)
    assert ended.returncode == 0, ended.stdout + ended.stderr
    log = (out / "slow.log").read_text()
    assert log.startswith("first\nsecond\nended with 0 after ") and (runs / "slow.rc").read_text() == "0\n"
    again = long_sh("start", "slow", "true", runs=runs)
    assert again.returncode == 2 and "it ran already here" in again.stderr  # its log is kept, not overwritten


def test_a_failing_run_keeps_its_exit_status_and_unknown_names_are_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert long_sh("start", "fails", "bash", "-c", "echo no; exit 4", runs=runs).returncode == 0
    assert long_sh("wait", "fails", "60", runs=runs).returncode == 0
    assert (runs / "fails.rc").read_text() == "4\n" and "ended with 4" in (runs / "fails.log").read_text()
    missing = long_sh("wait", "other", runs=runs)
    assert missing.returncode == 2 and "never started here" in missing.stderr
    assert long_sh("start", "empty", runs=runs).returncode == 2
