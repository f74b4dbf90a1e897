"""Server processes of the team's stores: started in their own process group with their log, waited for until
they answer, stopped with their temporary folders; free ports on the loopback address."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not start; the message ends with the tail of its log."""


@dataclass
class Service:
    """A server process started by this module, its log file, and what to delete once it stopped."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    cleanup: list[Path] = field(default_factory=list)
    stop_signal: int = signal.SIGTERM  # PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for its clients)
    stop_seconds: float = 30.0  # then SIGKILL

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return text[-chars:]

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds; raise `ServiceError` with the log if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                exited = self.process.poll() is not None
                if exited or time.monotonic() > deadline:
                    why = f"exited with {self.process.returncode}" if exited else f"did not start in {timeout:.0f} s"
                    raise ServiceError(f"{self.name} {why}; {self.log}:\n{self.log_tail()}")
                time.sleep(0.3)
        except BaseException:  # not started, or interrupted while starting: nothing is left running
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the process (and its process group), then delete its temporary folders."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def listening(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def start(
    name: str, command: list[str], log: Path, env: Mapping[str, str] | None = None, user: str | None = None
) -> Service:
    """Start `command` in its own process group, stdout and stderr to `log` (as `user` when given)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            user=user,
        )
    return Service(name, process, log)


def wait_for_interrupt(service: Service) -> None:
    """Wait for Ctrl-C (or `kill`), then stop `service`."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            service.process.wait()
    finally:
        service.stop()
