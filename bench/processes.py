"""Child processes for a benchmark run: started with the real CLI, logged to files, always stopped.

Each child runs in its own session, so stopping it also stops anything it
spawned (Triton's server binary and Python backend stubs included).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The worker's load line per model version: `loaded model NAME version N on PROVIDER (...)`.
WORKER_PROVIDER_LINE = re.compile(r"loaded model (\S+) version \d+ on (\w+)")


def worker_providers(worker_log: str) -> dict[str, str]:
    """Model -> the execution provider the worker got for it, read off the worker's log."""
    return dict(WORKER_PROVIDER_LINE.findall(worker_log))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `with Children(...)` stops every child.

    Python's default SIGTERM action ends the process at once; the children,
    each in its own session, would outlive the run and skew the next one.
    """

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


class Child:
    """One child process whose stdout and stderr go to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.output()[-3000:]
            raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}; log tail:\n{tail}")

    def wait_for_output(self, needle: str, timeout_s: float) -> None:
        def seen() -> bool:
            if needle in self.output():
                return True
            self.check_alive()
            return False

        wait_until(seen, timeout_s, f"{needle!r} in {self.name}'s log ({self.log_path})")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child's whole session so far (Linux /proc), 0 when gone."""
        total = 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                # fields[3] is the session id (field 6 of stat), 11/12 are utime/stime (fields 14/15).
                if int(fields[3]) == self.popen.pid:
                    total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, SIGKILL after `grace_s`; then SIGKILL whatever is left in its session."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


class Children:
    """Every child of a run; `close()` (or leaving the `with` block) stops them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir, env)
        self.children.append(child)
        return child

    def meshserve(self, name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """`python -m meshserve ARGS`: the same CLI an operator runs."""
        return self.start(name, [sys.executable, "-m", "meshserve", *args], env)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
