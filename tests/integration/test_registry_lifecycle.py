"""The registry client's lifecycle against the embedded agent: watchers, heartbeats, tag changes,
drain, and surviving an agent restart (stale data kept, service re-registered, watch resumed)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from registry.discovery import KVWatcher, ServiceWatcher, kv_delete, kv_get, kv_put
from registry.metrics import RegistryMetrics
from registry.model import EndpointChange, ServiceInstance
from registry.registration import SelfRegistration, ServiceRegistration, new_service_id
from registry.settings import RegistrySettings
from registry.url import connect
from tests.harness import ProcessGroup

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning"),
]

FAST = RegistrySettings(
    registry_watch_wait_s=10,
    registry_backoff_initial_s=0.05,
    registry_backoff_max_s=0.5,
    registry_resync_interval_s=0.5,
)


class Collector:
    """Runs a watcher in the background and keeps every batch it delivers."""

    def __init__(self, watcher: ServiceWatcher) -> None:
        self.watcher = watcher
        self.batches: list[list[EndpointChange]] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.watcher:
            self.batches.append(batch)

    def passing(self) -> dict[str, ServiceInstance]:
        return self.watcher.snapshot()

    async def until(self, predicate, within: float, what: str) -> float:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > within:
                raise AssertionError(f"timed out after {within}s waiting for {what}; batches: {self.batches}")
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def close(self) -> None:
        await self.watcher.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def agent(processes: ProcessGroup) -> AsyncIterator[str]:
    _, url = processes.registry()
    yield url


async def test_ttl_registration_heartbeats_retags_without_flapping_and_drains(agent: str) -> None:
    watch = Collector(ServiceWatcher(agent, settings=FAST))
    reg = ServiceRegistration(new_service_id(7001), "127.0.0.1", 7001, tags=["model=mlp:1"], check="ttl", ttl="1s")
    registration = SelfRegistration(agent, reg, settings=FAST)
    try:
        await registration.start()
        await watch.until(lambda: reg.service_id in watch.passing(), 3, "the TTL-registered worker to pass")
        await asyncio.sleep(1.5)  # longer than the TTL: heartbeats must keep it passing
        assert reg.service_id in watch.passing()
        await registration.set_tags(["model=mlp:1", "model=mlp:2"])
        await watch.until(lambda: watch.passing()[reg.service_id].serves("mlp", "2"), 2, "the new model version's tag")
        kinds = [change.kind for batch in watch.batches for change in batch]
        assert "removed" not in kinds, "re-registering with new tags must not take the worker out of passing"
        assert "updated" in kinds
        await registration.drain()
        await watch.until(lambda: reg.service_id not in watch.passing(), 1, "the drained worker to leave")
        client = connect(agent)
        try:
            _, entries = await client.health.service("meshserve-worker")
        finally:
            await client.close()
        assert entries == []  # deregistered, not just in maintenance
    finally:
        await registration.close()
        await watch.close()


async def test_agent_restart_keeps_last_set_as_stale_and_the_worker_registers_again(
    processes: ProcessGroup, demo_repository: Path
) -> None:
    agent_proc, url = processes.registry()
    port = int(url.rsplit(":", 1)[1])
    worker, address = processes.worker(demo_repository, registry_url=url)
    metrics = RegistryMetrics(CollectorRegistry())
    watch = Collector(ServiceWatcher(url, settings=FAST, metrics=metrics))
    try:
        await watch.until(lambda: len(watch.passing()) == 1, 10, "the worker to register and pass")
        (before,) = watch.passing().values()
        assert before.port == int(address.rsplit(":", 1)[1])

        agent_proc.kill9()
        await watch.until(lambda: watch.watcher.stale, 5, "the watcher to notice the agent is gone")
        assert watch.passing() == {before.id: before}, "the last known set must be kept while stale"
        assert metrics.stale.labels("service:meshserve-worker")._value.get() == 1

        processes.registry(port)  # a fresh, empty agent on the same port
        await watch.until(lambda: not watch.watcher.stale, 5, "the watch to resume")
        await watch.until(
            lambda: before.id in watch.passing(), 8, "the worker to register again by itself and pass its check"
        )
        assert metrics.stale.labels("service:meshserve-worker")._value.get() == 0
        assert worker.alive()
    finally:
        await watch.close()


async def test_kv_watcher_follows_a_prefix(agent: str) -> None:
    watcher = KVWatcher(agent, "meshserve/routes/", settings=FAST)
    try:
        assert await asyncio.wait_for(anext(watcher), 5) == {}
        assert await kv_put(agent, "meshserve/routes/mlp", b'{"weights": {"1": 90, "2": 10}}', cas=0)
        started = time.monotonic()
        snapshot = await asyncio.wait_for(anext(watcher), 5)
        assert time.monotonic() - started < 1.0  # routes apply within a second (DESIGN.md)
        assert snapshot == {"meshserve/routes/mlp": b'{"weights": {"1": 90, "2": 10}}'}
        value, modify_index = await kv_get(agent, "meshserve/routes/mlp")
        assert value == snapshot["meshserve/routes/mlp"] and modify_index > 0
        assert not await kv_put(agent, "meshserve/routes/mlp", b"{}", cas=modify_index + 1)
        assert await kv_put(agent, "meshserve/routes/mlp", b"{}", cas=modify_index)
        assert await asyncio.wait_for(anext(watcher), 5) == {"meshserve/routes/mlp": b"{}"}
        await kv_delete(agent, "meshserve/routes/mlp")
        assert await asyncio.wait_for(anext(watcher), 5) == {}
        assert await kv_get(agent, "meshserve/routes/mlp") == (None, 0)
    finally:
        await watcher.close()


async def test_closing_a_watcher_ends_its_iteration(agent: str) -> None:
    watcher = ServiceWatcher(agent, settings=FAST)
    assert await asyncio.wait_for(anext(watcher), 5) == []
    pending = asyncio.create_task(anext(watcher))  # held by a blocking query
    await asyncio.sleep(0.2)
    await watcher.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)


async def test_a_forgotten_ttl_service_registers_again(agent: str) -> None:
    reg = ServiceRegistration(new_service_id(7002), "127.0.0.1", 7002, check="ttl", ttl="3s")
    registration = SelfRegistration(agent, reg, settings=FAST)
    client = connect(agent)
    try:
        await registration.start()
        assert registration.registrations == 1
        assert await client.agent.service.deregister(reg.service_id)  # the agent forgets it (e.g. an operator)
        # The next heartbeat answers 404, and the service comes back with a passing TTL check.
        for _ in range(100):
            if registration.registrations >= 2:
                break
            await asyncio.sleep(0.05)
        assert registration.registrations == 2
        _, passing = await client.health.service("meshserve-worker", passing=True)
        assert [entry["Service"]["ID"] for entry in passing] == [reg.service_id]
    finally:
        await registration.close()
        await client.close()
