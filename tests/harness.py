"""Real processes on loopback for integration tests.

Every process started through a `ProcessGroup` is stopped when the group
closes (the `processes` fixture closes it even when the test fails), and each
runs in its own session so a stray child cannot outlive the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
# Read at import, before tests/conftest.py hides the host's GPUs from the tests and every process they start.
HOST_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")


def host_gpu_env() -> dict[str, str]:
    """This process's environment with the host's GPUs visible again, for the tests that ask for the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if HOST_CUDA_VISIBLE_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = HOST_CUDA_VISIBLE_DEVICES
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


def grpc_serving(address: str, service: str = "", timeout: float = 0.5) -> bool:
    """True when `address` answers grpc.health.v1 Check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class ManagedProcess:
    """One `python -m meshserve ...` child whose output goes to a log file."""

    def __init__(
        self, name: str, args: Sequence[str], env: dict[str, str] | None, log_dir: Path, gpu: bool = False
    ) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "meshserve", *args]
        self.log_path = log_dir / f"{name}.log"
        base = host_gpu_env() if gpu else os.environ
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        # The child writes to its own copy of the descriptor; ours is closed at
        # once so that reading the log never races a buffered writer here.
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                cwd=REPO_ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if not self.alive() and needle not in self.output():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
            return needle in self.output()

        wait_until(seen, timeout, what=f"{needle!r} in {self.name}'s output")

    def wait_serving(self, address: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
            return grpc_serving(address)

        wait_until(ready, timeout, interval=0.1, what=f"{self.name} serving on {address}")

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def kill9(self) -> None:
        """SIGKILL the process (and its session), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        # Children of the process's session (if any) must not outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


class ProcessGroup:
    """Starts meshserve processes and guarantees their teardown."""

    def __init__(self, log_dir: Path | None = None, gpu: bool = False) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="meshserve-test-"))
        self.processes: list[ManagedProcess] = []
        self.gpu = gpu  # whether its processes see the host's GPUs

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, args, env, self.log_dir, self.gpu)
        self.processes.append(proc)
        return proc

    def registry(self, port: int | None = None) -> tuple[ManagedProcess, str]:
        """The embedded registry agent; returns it and its `consul://` URL once it answers."""
        port = port or free_port()
        proc = self.start(f"registry-{port}", "registry", "--port", str(port))
        wait_until(lambda: port_open(port), 30, what=f"registry on port {port}")
        return proc, f"consul://127.0.0.1:{port}"

    def worker(
        self, model_repository: Path, *extra: str, registry_url: str | None = None, name: str | None = None
    ) -> tuple[ManagedProcess, str]:
        """A worker on a free port; returns it and its `host:port` once it serves."""
        port = free_port()
        args = ["worker", "--model-repository", str(model_repository), "--port", str(port), *extra]
        if registry_url:
            args += ["--registry", registry_url]
        proc = self.start(name or f"worker-{port}", *args)
        address = f"127.0.0.1:{port}"
        proc.wait_serving(address)
        return proc, address

    def gateway(
        self, registry_url: str, *extra: str, env: dict[str, str] | None = None, name: str = "gateway"
    ) -> tuple[ManagedProcess, str]:
        """A gateway on a free loopback port (metrics on a free port unless `extra` names one); returns it
        and its `host:port` once it serves."""
        port = free_port()
        args = ["gateway", "--registry", registry_url, "--host", "127.0.0.1", "--port", str(port)]
        if "--metrics-port" not in extra:
            args += ["--metrics-port", "0"]
        proc = self.start(name, *args, *extra, env=env)
        address = f"127.0.0.1:{port}"
        proc.wait_serving(address)
        return proc, address

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(timeout=10)

    def dump_logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.output()[-3000:]}" for p in self.processes)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def process_group() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()
