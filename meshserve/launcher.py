"""`meshserve up`: the whole mesh on one machine, as supervised child processes.

Start order: registry, workers, gateway; the gateway is ready once a worker
passes its health check. Stop order (Ctrl-C / SIGTERM): gateway, workers
(each drains), registry; a second Ctrl-C kills what still runs. A child that
dies meanwhile is reported and started again. Children run in their own
sessions so a terminal's Ctrl-C reaches only the launcher, which then stops
them in order; on Linux they also get SIGTERM if the launcher itself is
killed, so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from meshserve.settings import MeshSettings

DEMO_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshserve" / "demo-models"
_DEMO_STAMP = ".complete"


class UpSettings(MeshSettings):
    workers: int = Field(2, ge=1)
    port: int = 8001
    host: str = "127.0.0.1"
    model_repository: Path | None = None
    api_key: str | None = None
    # Tenants and keys beside the API key; created empty when missing, reloaded live.
    auth_file: Path | None = None
    registry_port: int = 8500
    metrics_port: int = 8002
    log_level: str = "info"
    # Seconds each worker may take to drain on stop.
    drain_grace: float = 10.0
    ready_timeout_s: float = 120.0


class LaunchError(RuntimeError):
    """The mesh cannot start (port in use, bad repository); the message says what to do."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def demo_repository(cache: Path = DEMO_CACHE) -> Path:
    """The demo models, written once into the user's cache."""
    if not (cache / _DEMO_STAMP).exists():
        from meshserve.demo_models import write_demo_repository

        write_demo_repository(cache)
        (cache / _DEMO_STAMP).write_text("ok\n")
    return cache


def example_model(repository: Path) -> str:
    """The model the banner's example uses: digits when there, else the first in the repository."""
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    return "digits" if "digits" in names or not names else names[0]


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec function that sends the child `signum` when its parent dies (Linux), or None.

    libc is loaded here, in the parent: between fork and exec the child only
    makes the one prctl call (no imports, no locks). It is bound through
    `PyDLL`, which keeps the GIL during the call: a CDLL call releases it, and
    if another thread of the parent had asked for the GIL at fork time, the
    child waits forever for that thread to take it (seen as a hung spawn).
    Linux ties the signal to the thread that forked, so only children started
    from the main thread get it (a helper thread's exit must not take its
    children with it).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.PyDLL(None).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, signum)

    return set_signal


def render(name: str, line: str) -> str:
    """A child's log line, prefixed; JSON log lines are shown as 'level message'."""
    text = line.rstrip()
    if text.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(text)
            extra = f" [{entry['model']}]" if entry.get("model") else ""
            text = f"{entry.get('level', ''):<7} {entry.get('message', '')}{extra}"
            if entry.get("exception"):
                text += "\n" + entry["exception"]
    return f"{name:>9} | {text}"


@dataclass
class Child:
    """One supervised `python -m meshserve ...` process."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0

    async def start(self, emit: Callable[[str], None]) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshserve",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        emit(f"{'up':>9} | started {self.name} (pid {self.process.pid})")

    def kill(self) -> None:
        """SIGKILL, if it is still running."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def pump(self, emit: Callable[[str], None]) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            emit(render(self.name, line.decode(errors="replace")))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


class Launcher:
    def __init__(self, settings: UpSettings, emit: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.emit = emit
        self.registry_url = f"consul://127.0.0.1:{settings.registry_port}"
        self.stopping = asyncio.Event()
        self.forced = False  # a second signal killed the children instead of letting them drain
        self._supervisors: list[asyncio.Task[None]] = []
        self.registry: Child | None = None
        self.workers: list[Child] = []
        self.gateway: Child | None = None

    def check_ports(self) -> None:
        s = self.settings
        wanted = {"--port (gateway)": s.port, "--registry-port": s.registry_port, "--metrics-port": s.metrics_port}
        taken = [f"{flag} {port}" for flag, port in wanted.items() if port and not port_free(port)]
        if taken:
            raise LaunchError(
                f"port(s) in use: {', '.join(taken)}. Stop what uses them or choose others, "
                f"e.g. meshserve up --port 9001 --registry-port 9500 --metrics-port 9002"
            )

    def plan(self, repository: Path, api_key: str) -> None:
        s = self.settings
        common = ["--log-level", s.log_level]
        self.registry = Child("registry", ["registry", "--port", str(s.registry_port), *common])
        self.workers = [
            Child(
                f"worker-{index + 1}",
                [
                    "worker",
                    "--model-repository",
                    str(repository),
                    "--registry",
                    self.registry_url,
                    "--port",
                    "0",
                    "--host",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    "--metrics-port",
                    "0",
                    "--drain-grace",
                    str(s.drain_grace),
                    *common,
                ],
            )
            for index in range(s.workers)
        ]
        self.gateway = Child(
            "gateway",
            [
                "gateway",
                "--registry",
                self.registry_url,
                "--host",
                s.host,
                "--port",
                str(s.port),
                "--metrics-port",
                str(s.metrics_port),
                # Its clients call it directly, with nothing in front that a delay would give time
                # to notice; it still lets what is in flight finish before it stops.
                "--drain-delay",
                "0",
                *common,
            ],
            # Through the environment, so the key does not show in `ps`.
            env={"MESHSERVE_API_KEY": api_key}
            | ({"MESHSERVE_AUTH_FILE": str(s.auth_file.resolve())} if s.auth_file is not None else {}),
        )

    async def _supervise(self, child: Child) -> None:
        """Streams the child's output; restarts it when it dies outside a shutdown."""
        while True:
            await child.pump(self.emit)
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping.is_set():
                return
            child.restarts += 1
            delay = min(10.0, 0.5 * 2 ** min(child.restarts - 1, 5))
            self.emit(f"{'up':>9} | {child.name} exited with code {code}; restarting in {delay:.1f}s")
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await child.start(self.emit)

    async def _start(self, child: Child) -> None:
        await child.start(self.emit)
        self._supervisors.append(asyncio.get_running_loop().create_task(self._supervise(child)))

    async def _wait_port(self, port: int, child: Child, limit_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            if not child.alive and child.restarts == 0 and child.process and child.process.returncode is not None:
                raise LaunchError(f"{child.name} exited with code {child.process.returncode}; see its log above")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.1)
        raise LaunchError(f"{child.name} did not listen on port {port} within {limit_s:.0f}s")

    async def _wait_serving(self, address: str, child: Child, limit_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while loop.time() < deadline:
                if self.stopping.is_set():
                    return
                if child.process is not None and child.process.returncode is not None and child.restarts == 0:
                    raise LaunchError(f"{child.name} exited with code {child.process.returncode}; see its log above")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise LaunchError(f"the mesh was not ready within {limit_s:.0f}s")

    async def run(self, repository: Path, api_key: str) -> None:
        s = self.settings
        self.plan(repository, api_key)
        assert self.registry is not None and self.gateway is not None
        try:
            await self._start(self.registry)
            await self._wait_port(s.registry_port, self.registry, 30)
            for worker in self.workers:
                await self._start(worker)
            await self._start(self.gateway)
            await self._wait_serving(f"127.0.0.1:{s.port}", self.gateway, s.ready_timeout_s)
            if not self.stopping.is_set():
                self._banner(api_key, example_model(repository))
            await self.stopping.wait()
        finally:
            await self.shutdown()

    def _banner(self, api_key: str, model: str) -> None:
        s = self.settings
        lines = [
            "",
            f"meshserve is up: {s.workers} worker(s) behind the gateway",
            f"  gateway   {s.host}:{s.port}   (KServe v2 gRPC; tritonclient works)",
            f"  API key   {api_key}",
            f"  registry  {self.registry_url}",
            f"  metrics   http://127.0.0.1:{s.metrics_port}/metrics",
            "",
            "try:",
            f"  meshserve infer {model} --random --url 127.0.0.1:{s.port} --api-key {api_key}",
            "",
            "Ctrl-C stops everything.",
            "",
        ]
        for line in lines:
            self.emit(f"{'up':>9} | {line}" if line else "")

    def request_stop(self) -> None:
        """The first SIGINT/SIGTERM stops the mesh in order, each child draining; a second one (an impatient
        Ctrl-C) kills whatever is still running at once."""
        if not self.stopping.is_set():
            self.stopping.set()
            return
        if self.forced:
            return
        self.forced = True
        self.emit(f"{'up':>9} | second signal: killing what still runs, without draining")
        for child in (self.gateway, *self.workers, self.registry):
            if child is not None:
                child.kill()

    async def shutdown(self) -> None:
        self.stopping.set()
        self.emit(f"{'up':>9} | stopping: gateway, then workers (draining), then registry")
        if self.gateway is not None:
            await self.gateway.stop(20)  # its drain grace (10 s) and the flush after it
        await asyncio.gather(*(worker.stop(self.settings.drain_grace + 10) for worker in self.workers))
        if self.registry is not None:
            await self.registry.stop(10)
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        self.emit(f"{'up':>9} | stopped")


async def launch(settings: UpSettings, repository: Path, api_key: str, emit: Callable[[str], None] = print) -> None:
    launcher = Launcher(settings, emit)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, launcher.request_stop)
    launcher.check_ports()
    await launcher.run(repository, api_key)
    if launcher.forced:
        raise LaunchError("stopped by a second signal: the workers and the gateway were killed, not drained")
