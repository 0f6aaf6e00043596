"""The gateway under failure: kill -9 one of 3 workers while 16 clients send, SIGTERM another, then
the registry goes away; clients see no failed request at any point."""

from __future__ import annotations

import asyncio
import collections
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.harness import ManagedProcess, ProcessGroup, free_port

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

CLIENTS = 16


class Load:
    """16 tritonclient.aio clients sending mlp784 requests through the gateway until stopped."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ok = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()
        self.workers_seen: set[str] = set()

    async def run(self) -> None:
        x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
        async with triton_aio.InferenceServerClient(self.address) as client:

            async def sender() -> None:
                tensor = triton.InferInput("input", [1, 784], "FP32")
                tensor.set_data_from_numpy(x)
                while not self.stop.is_set():
                    try:
                        await client.infer("mlp784", [tensor], client_timeout=10)
                        self.ok += 1
                    except InferenceServerException as exc:
                        self.failures[f"{exc.status()}: {exc.message()}"] += 1

            await asyncio.gather(*(sender() for _ in range(CLIENTS)))

    async def for_a_while(self, seconds: float) -> int:
        before = self.ok
        await asyncio.sleep(seconds)
        return self.ok - before


async def test_kill9_sigterm_and_registry_loss_under_load(
    demo_repository: Path, processes: ProcessGroup, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(demo_repository / "mlp784", repository / "mlp784")
    registry, registry_url = processes.registry()
    workers = [processes.worker(repository, "--host", "127.0.0.1", registry_url=registry_url)[0] for _ in range(3)]
    gateway, address = processes.gateway(registry_url)
    gateway.wait_for_output("127.0.0.1", timeout=10)
    await asyncio.sleep(1.0)  # all three registered and picked up

    load = Load(address)
    task = asyncio.get_running_loop().create_task(load.run())
    try:
        assert await load.for_a_while(1.0) > 0
        workers[0].kill9()
        after_kill = await load.for_a_while(3.0)
        assert after_kill > 0
        assert not load.failures, load.failures

        # A graceful stop (SIGTERM: deregister, drain) loses nothing either.
        assert workers[1].stop(timeout=30) == 0
        assert await load.for_a_while(1.0) > 0
        assert not load.failures, load.failures

        # The registry disappears: the gateway keeps the last known workers.
        registry.kill9()
        while_down = await load.for_a_while(3.0)
        assert while_down > 0
    finally:
        load.stop.set()
        await asyncio.wait_for(task, 30)
    assert not load.failures, load.failures
    assert gateway.alive()
    assert "registry unreachable" in gateway.output()


def test_a_gateway_accepts_requests_only_once_it_has_read_the_registry(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    """One that listened first would answer NOT_FOUND for every model meanwhile (with --processes N, SO_REUSEPORT
    handed such a process connections while its sibling served: a flaky CI failure once)."""
    _, registry_url = processes.registry()
    processes.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
    gateway, address = processes.gateway(registry_url, "--api-key", "k")
    log = gateway.output()
    serving = log.index("gateway serving on")
    assert log.index("worker 127.0.0.1:") < serving and log.index("routes: ") < serving
    with triton.InferenceServerClient(address) as client:
        assert client.is_model_ready("mlp784", headers={"authorization": "Bearer k"})


def gateway_without_registry(processes: ProcessGroup, first_read_s: int) -> tuple[ManagedProcess, int]:
    """A gateway whose registry address has nothing listening; returns it and its port."""
    port, nothing_there = free_port(), free_port()
    gateway = processes.start(
        "gateway", "gateway", "--registry", f"consul://127.0.0.1:{nothing_there}", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", "0", env={"MESHSERVE_REGISTRY_FIRST_READ_S": str(first_read_s)},
    )  # fmt: skip
    return gateway, port


def test_with_the_registry_unreachable_a_gateway_serves_after_its_first_read_limit(processes: ProcessGroup) -> None:
    gateway, port = gateway_without_registry(processes, first_read_s=1)
    gateway.wait_for_output("gateway serving on", timeout=30)
    assert "not read within 1 s: serving anyway" in gateway.output()
    with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_live()
        assert not client.is_server_ready()  # no passing worker known


def test_a_gateway_waiting_for_its_first_registry_read_stops_at_once_on_sigterm(processes: ProcessGroup) -> None:
    """An orchestrator's stop (compose: 10 s, then SIGKILL) must not wait out the first-read limit."""
    gateway, _ = gateway_without_registry(processes, first_read_s=120)
    gateway.wait_for_output("registry unreachable", timeout=30)  # the watch has tried: start() is waiting
    started = time.monotonic()
    assert gateway.stop(timeout=30) == 0
    assert time.monotonic() - started < 20, "the stop waited for the first-read limit"
    assert "gateway serving on" not in gateway.output()
