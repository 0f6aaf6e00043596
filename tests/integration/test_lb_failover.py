"""The balancer in front of real workers registered in a real registry, under load.

Each scenario: `meshserve registry`, three `meshserve worker`s registering in
it, and a small client: `ServiceWatcher` -> `Balancer` -> unary `ModelInfer`
over the endpoint's channel (the default connector). Load is bounded (a few
hundred requests, or a paced stream while processes are killed/restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from loadbalancer.balancer import AttemptEvent, Balancer, ModelPolicy
from loadbalancer.connection import grpc_connector
from loadbalancer.endpoint import Endpoint
from loadbalancer.errors import classify
from loadbalancer.settings import BalancerSettings
from protos import grpc_service_pb2, grpc_service_pb2_grpc
from registry.discovery import ServiceWatcher
from tests.harness import ManagedProcess, ProcessGroup, free_port, grpc_serving, port_open, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(120)]

MODEL = "mlp784"
REQUEST_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory, demo_repository: Path) -> Path:
    """Only the small MLP, so workers start fast."""
    root = tmp_path_factory.mktemp("lb-models")
    shutil.copytree(demo_repository / MODEL, root / MODEL)
    return root


def infer_request() -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32")
    tensor.shape.extend([1, 784])
    request.raw_input_contents.append(np.ones((1, 784), np.float32).tobytes())
    return request


class Client:
    """Registry-fed balancer plus a unary ModelInfer attempt that reads the worker's load report."""

    def __init__(self, registry_url: str, **settings: object) -> None:
        self.balancer = Balancer(BalancerSettings(**settings), grpc_connector, on_attempt=self._observe)
        self.watcher = ServiceWatcher(registry_url)
        self.request = infer_request()
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.served_by: Counter[str] = Counter()
        # Attempts that failed or took over a second, to tell in a failure's message where a request went.
        self.trouble: list[str] = []
        self._started = time.monotonic()
        self._watch = asyncio.create_task(self._follow())

    def _observe(self, event: AttemptEvent) -> None:
        if event.outcome != "ok" or event.duration_s > 1.0:
            ended = time.monotonic() - self._started
            self.trouble.append(
                f"{ended:.3f}s: attempt {event.attempt} on {event.endpoint.target} {event.outcome} after "
                f"{event.duration_s:.3f}s (removed {event.endpoint.removed}, draining {event.endpoint.draining})"
            )

    async def _follow(self) -> None:
        async for changes in self.watcher:
            self.balancer.apply(changes)

    async def _attempt(self, endpoint: Endpoint, remaining: float | None) -> grpc_service_pb2.ModelInferResponse:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(endpoint.connection.channel)  # type: ignore[attr-defined]
        call = stub.ModelInfer(self.request, timeout=remaining)
        response = await call
        trailers = dict(await call.trailing_metadata() or ())
        if "meshserve-queue-depth" in trailers:
            endpoint.report_load(int(trailers["meshserve-queue-depth"]), int(trailers.get("meshserve-in-flight", 0)))
        self.served_by[endpoint.target] += 1
        return response

    async def infer(self) -> None:
        start = time.perf_counter()
        try:
            response = await self.balancer.call(MODEL, "1", self._attempt, timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:
            self.errors[f"{type(exc).__name__}: {classify(exc).describe()}"] += 1
            return
        assert response.outputs[0].name == "probabilities"
        self.latencies.append(time.perf_counter() - start)

    async def load(self, clients: int, requests: int) -> None:
        """`requests` requests from `clients` concurrent callers."""

        async def caller(count: int) -> None:
            for _ in range(count):
                await self.infer()

        await asyncio.gather(*(caller(requests // clients) for _ in range(clients)))

    @contextlib.asynccontextmanager
    async def steady_load(self, clients: int = 2, pause_s: float = 0.005) -> AsyncIterator[None]:
        """Paced load for as long as the block runs."""
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                await self.infer()
                await asyncio.sleep(pause_s)

        callers = [asyncio.create_task(caller()) for _ in range(clients)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*callers)

    def targets(self) -> set[str]:
        return {endpoint.target for endpoint in self.balancer.endpoints(MODEL)}

    async def wait_for_targets(self, wanted: set[str]) -> None:
        await eventually(lambda: self.targets() == wanted, f"the balancer to see exactly {wanted}")

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))

    async def close(self) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.watcher.close()
        await self.balancer.close()


async def eventually(predicate: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    """Polls without blocking the event loop (the load keeps running meanwhile)."""
    deadline = time.monotonic() + within_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def start_workers(
    processes: ProcessGroup, repository: Path, registry_url: str, count: int, *extra: str
) -> list[tuple[ManagedProcess, str]]:
    """Starts `count` workers at once, then waits for each to serve."""
    started = []
    for _ in range(count):
        port = free_port()
        proc = processes.start(
            f"worker-{port}",
            "worker",
            "--model-repository",
            str(repository),
            "--port",
            str(port),
            "--registry",
            registry_url,
            "--metrics-port",
            "0",
            # No grace between deregistering and refusing work: requests still in
            # flight towards a stopping worker must be failed over, not waited for.
            "--drain-delay",
            "0",
            "--drain-grace",
            "5",
            *extra,
        )
        started.append((proc, f"127.0.0.1:{port}"))
    for proc, address in started:
        proc.wait_serving(address)
    return started


async def test_slow_worker_p2c_ewma_p99_is_at_most_half_of_round_robin(
    processes: ProcessGroup, mlp_repository: Path
) -> None:
    _, url = processes.registry()
    workers = start_workers(processes, mlp_repository, url, 2)
    workers += start_workers(processes, mlp_repository, url, 1, "--inject-latency-ms", "200")
    slow_address = workers[-1][1]
    p99: dict[str, float] = {}
    to_slow: dict[str, int] = {}
    for policy in ("round_robin", "p2c_ewma"):
        client = Client(url)
        try:
            client.balancer.set_model_policy(MODEL, ModelPolicy(policy=policy))
            await client.wait_for_targets({address for _, address in workers})
            await client.load(clients=3, requests=45)  # warm-up: estimates settle
            client.latencies.clear()
            client.served_by.clear()
            await client.load(clients=3, requests=300)
            assert not client.errors
            p99[policy] = client.p99()
            to_slow[policy] = client.served_by[slow_address]
        finally:
            await client.close()
    assert to_slow["round_robin"] == 100
    assert to_slow["p2c_ewma"] < 30, to_slow
    assert p99["p2c_ewma"] <= 0.5 * p99["round_robin"], p99


async def test_kill_9_one_of_three_workers_under_load_fails_no_request(
    processes: ProcessGroup, mlp_repository: Path
) -> None:
    _, url = processes.registry()
    workers = start_workers(processes, mlp_repository, url, 3)
    client = Client(url)
    try:
        await client.wait_for_targets({address for _, address in workers})
        victim, victim_address = workers[0]
        async with client.steady_load(clients=3, pause_s=0.002):
            await asyncio.sleep(1.0)
            assert client.served_by[victim_address] > 0
            victim.kill9()
            served_before = sum(client.served_by.values())
            await asyncio.sleep(3.0)
        assert sum(client.served_by.values()) - served_before > 100  # traffic kept flowing
        assert not client.errors, (client.errors, client.trouble)
        await client.wait_for_targets({address for _, address in workers[1:]})  # the registry dropped it
    finally:
        await client.close()


async def test_rolling_restart_under_load_fails_no_request(processes: ProcessGroup, mlp_repository: Path) -> None:
    _, url = processes.registry()
    workers = start_workers(processes, mlp_repository, url, 3)
    client = Client(url)
    try:
        await client.wait_for_targets({address for _, address in workers})
        async with client.steady_load(clients=2):
            for index in range(len(workers)):
                old, _ = workers[index]
                old.signal(signal.SIGTERM)  # drain, then exit
                assert await asyncio.to_thread(old.popen.wait, 20) == 0
                workers[index] = (await asyncio.to_thread(start_workers, processes, mlp_repository, url, 1))[0]
                await client.wait_for_targets({address for _, address in workers})
            await asyncio.sleep(0.5)
        assert not client.errors, (client.errors, client.trouble)
        restarted = {address for _, address in workers}
        assert restarted <= set(client.served_by)  # the new workers took traffic
    finally:
        await client.close()


async def test_registry_down_for_10s_under_load_fails_no_request(processes: ProcessGroup, mlp_repository: Path) -> None:
    port = free_port()
    registry, url = processes.registry(port)
    workers = start_workers(processes, mlp_repository, url, 3)
    client = Client(url)
    try:
        await client.wait_for_targets({address for _, address in workers})
        async with client.steady_load(clients=2, pause_s=0.01):
            await asyncio.sleep(0.5)
            registry.kill9()
            during = sum(client.served_by.values())
            await asyncio.sleep(10.0)
            assert client.watcher.stale
            assert client.targets() == {address for _, address in workers}  # last known endpoints kept
            assert sum(client.served_by.values()) - during > 200  # and traffic kept flowing to them
            assert not client.errors, client.errors
            # Back up: the workers register again and the watcher catches up.
            processes.registry(port)
            await asyncio.to_thread(wait_until, lambda: port_open(port), 30)
            for _, address in workers:
                assert grpc_serving(address)
            await eventually(lambda: not client.watcher.stale, "the watcher to reach the registry again")
            await client.wait_for_targets({address for _, address in workers})
        assert not client.watcher.stale
        assert not client.errors, client.errors
    finally:
        await client.close()
