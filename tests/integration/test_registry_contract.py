"""The registry contract over real HTTP, through py-consul: against the embedded agent (a
`meshserve registry` process) always, and against a real Consul agent when CONSUL_HTTP_ADDR is set,
so drift between the two shows up wherever a real agent exists."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import consul
import consul.aio
import pytest

from registry.url import connect
from tests.harness import ProcessGroup

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning"),
]


@dataclass
class Target:
    kind: str  # "embedded" or "consul"
    url: str

    @property
    def embedded(self) -> bool:
        return self.kind == "embedded"


@pytest.fixture(params=["embedded", "consul"])
def target(request: pytest.FixtureRequest, processes: ProcessGroup) -> Target:
    if request.param == "consul":
        address = os.environ.get("CONSUL_HTTP_ADDR")
        if not address:
            pytest.skip("CONSUL_HTTP_ADDR is not set: this contract run needs a real Consul agent to compare against")
        return Target("consul", address)
    _, url = processes.registry()
    return Target("embedded", url)


@pytest.fixture
async def client(target: Target) -> AsyncIterator[consul.aio.Consul]:
    c = connect(target.url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def name() -> str:
    """A service name of this test's own, so runs against a shared Consul do not collide."""
    return f"contract-{uuid.uuid4().hex[:8]}"


async def eventually(predicate, within: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def check_status(client: consul.aio.Consul, check_id: str) -> str | None:
    checks = await client.agent.checks()
    return checks[check_id]["Status"] if check_id in checks else None


async def test_register_list_and_deregister(client: consul.aio.Consul, name: str) -> None:
    sid = f"{name}-1"
    check = {"TTL": "30s", "DeregisterCriticalServiceAfter": "1m"}
    ok = await client.agent.service.register(
        name, service_id=sid, address="127.0.0.1", port=9001, tags=["meshserve", "model=mlp:1"],
        meta={"device": "cpu", "grpc_port": "9001"}, check=check,
    )  # fmt: skip
    assert ok
    services = await client.agent.services()
    assert services[sid]["Service"] == name
    assert services[sid]["Tags"] == ["meshserve", "model=mlp:1"]
    assert services[sid]["Meta"] == {"device": "cpu", "grpc_port": "9001"}
    assert services[sid]["Port"] == 9001 and services[sid]["Address"] == "127.0.0.1"
    _, catalog = await client.catalog.services()
    assert set(catalog[name]) == {"meshserve", "model=mlp:1"}
    index, entries = await client.health.service(name)
    assert int(index) > 0
    (entry,) = entries
    service_check = next(c for c in entry["Checks"] if c["ServiceID"] == sid)
    assert service_check["CheckID"] == f"service:{sid}" and service_check["Status"] == "critical"
    _, passing = await client.health.service(name, passing=True)
    assert passing == []
    _, tagged = await client.health.service(name, tag=["meshserve", "model=mlp:1"])
    _, other = await client.health.service(name, tag="model=mlp:2")
    assert len(tagged) == 1 and other == []
    assert await client.agent.service.deregister(sid)
    assert sid not in await client.agent.services()
    assert not await client.agent.service.deregister(sid)  # 404: unknown service ID
    assert isinstance(await client.status.leader(), str)


async def test_ttl_check_passes_on_heartbeat_and_expires(client: consul.aio.Consul, name: str) -> None:
    sid = f"{name}-ttl"
    await client.agent.service.register(name, service_id=sid, port=1, check={"TTL": "1s"})
    check_id = f"service:{sid}"
    assert await client.agent.check.ttl_pass(check_id, "alive")
    assert await check_status(client, check_id) == "passing"
    _, passing = await client.health.service(name, passing=True)
    assert [e["Service"]["ID"] for e in passing] == [sid]
    await eventually(lambda: _is(client, check_id, "critical"), 4, "the TTL to expire")
    assert not await client.agent.check.ttl_pass(f"service:{name}-unknown")  # 404
    await client.agent.service.deregister(sid)


async def _is(client: consul.aio.Consul, check_id: str, status: str) -> bool:
    return await check_status(client, check_id) == status


async def test_grpc_check_follows_a_live_then_killed_worker_and_reaping(
    client: consul.aio.Consul, target: Target, name: str, processes: ProcessGroup, demo_repository: Path
) -> None:
    worker, address = processes.worker(demo_repository)  # unregistered: the test registers it by hand
    sid = f"{name}-grpc"
    check_id = f"service:{sid}"
    reap_after = "2s" if target.embedded else "1m"  # Consul's minimum is one minute
    host, port = address.rsplit(":", 1)
    check = {"GRPC": address, "Interval": "1s", "Timeout": "1s", "DeregisterCriticalServiceAfter": reap_after}
    await client.agent.service.register(name, service_id=sid, address=host, port=int(port), check=check)
    await eventually(lambda: _is(client, check_id, "passing"), 5, "the gRPC check to pass on a live worker")
    assert "success" in (await client.agent.checks())[check_id]["Output"]
    worker.kill9()
    await eventually(lambda: _is(client, check_id, "critical"), 4, "the gRPC check to fail on a killed worker")

    async def reaped() -> bool:
        return sid not in await client.agent.services()

    await eventually(reaped, 6 if target.embedded else 100, "DeregisterCriticalServiceAfter to remove the service")


async def test_maintenance_takes_a_service_out_of_passing(client: consul.aio.Consul, name: str) -> None:
    sid = f"{name}-m"
    await client.agent.service.register(name, service_id=sid, port=1, check={"TTL": "30s"})
    await client.agent.check.ttl_pass(f"service:{sid}")
    assert await client.agent.service.maintenance(sid, "true", "draining")
    _, passing = await client.health.service(name, passing=True)
    assert passing == []
    checks = await client.agent.checks()
    assert checks[f"_service_maintenance:{sid}"]["Status"] == "critical"
    assert checks[f"_service_maintenance:{sid}"]["Notes"] == "draining"
    assert await client.agent.service.maintenance(sid, "false")
    _, passing = await client.health.service(name, passing=True)
    assert len(passing) == 1
    assert not await client.agent.service.maintenance(f"{name}-nope", "true")  # 404
    await client.agent.service.deregister(sid)


async def test_blocking_query_wakes_within_100ms_of_a_change_and_holds_otherwise(
    client: consul.aio.Consul, name: str
) -> None:
    key = f"meshserve-test/{name}/route"
    await client.kv.put(key, b"v0")
    index, _ = await client.kv.get(key)

    started = time.monotonic()
    held_index, _ = await client.kv.get(key, index=index, wait="1s")
    held = time.monotonic() - started
    assert held_index == index
    assert 0.95 <= held < 1.0 + 1.0 / 16 + 0.5

    blocked = asyncio.create_task(client.kv.get(key, index=index, wait="10s"))
    await asyncio.sleep(0.3)
    assert not blocked.done()
    changed_at = time.monotonic()
    await client.kv.put(key, b"v1")
    new_index, entry = await blocked
    woke = time.monotonic() - changed_at
    assert int(new_index) > int(index) and entry["Value"] == b"v1"
    assert woke < 0.1, f"blocking query woke {woke * 1000:.0f} ms after the change"

    health_index, _ = await client.health.service(name)
    watcher = asyncio.create_task(client.health.service(name, index=health_index, wait="10s"))
    await asyncio.sleep(0.3)
    changed_at = time.monotonic()
    await client.agent.service.register(name, service_id=f"{name}-b", port=2)
    _, entries = await watcher
    woke = time.monotonic() - changed_at
    assert [e["Service"]["ID"] for e in entries] == [f"{name}-b"]
    assert woke < 0.1, f"health blocking query woke {woke * 1000:.0f} ms after the change"
    await client.agent.service.deregister(f"{name}-b")
    await client.kv.delete(key)


async def test_kv_cas_recurse_raw_delete(client: consul.aio.Consul, target: Target, name: str) -> None:
    prefix = f"meshserve-test/{name}/"
    assert await client.kv.put(prefix + "a", b'{"weights": {"1": 100}}', cas=0) is True
    assert await client.kv.put(prefix + "a", b"other", cas=0) is False  # exists already
    _, entry = await client.kv.get(prefix + "a")
    modify = entry["ModifyIndex"]
    assert await client.kv.put(prefix + "a", b"x", cas=modify + 1000) is False
    assert await client.kv.put(prefix + "a", b"v2", cas=modify) is True
    await client.kv.put(prefix + "b", b"")
    _, entries = await client.kv.get(prefix, recurse=True)
    assert {e["Key"]: e["Value"] for e in entries} == {prefix + "a": b"v2", prefix + "b": None}
    _, keys = await client.kv.get(prefix, keys=True)
    assert keys == [prefix + "a", prefix + "b"]
    _, missing = await client.kv.get(prefix + "missing")
    assert missing is None
    async with aiohttp.ClientSession() as http:
        base = target.url.replace("consul://", "http://")
        async with http.get(f"{base}/v1/kv/{prefix}a?raw") as response:
            assert response.status == 200 and await response.read() == b"v2"
            assert "X-Consul-Index" in response.headers
    assert await client.kv.delete(prefix, recurse=True)
    _, gone = await client.kv.get(prefix, recurse=True)
    assert gone is None
