"""The embedded agent's state store: indexes, check status, TTL expiry, reaping, maintenance, KV."""

from __future__ import annotations

import asyncio

import pytest

from registry.agent.definitions import parse_service
from registry.agent.state import AgentState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> AgentState:
    return AgentState(node="n1", address="127.0.0.1", clock=clock)


def register(state: AgentState, sid: str = "w1", **check: object) -> None:
    body = {"Name": "meshserve-worker", "ID": sid, "Port": 9000, "Tags": ["model=a:1"]}
    if check:
        body["Check"] = check
    state.register_service(parse_service(body, 1.0), replace_existing_checks=True)


def passing_ids(state: AgentState) -> list[str]:
    return [e["Service"]["ID"] for e in state.health_service("meshserve-worker", passing=True, tags=[])]


def test_new_checks_start_critical_and_passing_filters(state: AgentState) -> None:
    register(state, TTL="5s")
    assert passing_ids(state) == []
    assert state.update_check("service:w1", "passing", "ok")
    assert passing_ids(state) == ["w1"]
    assert state.health_service("meshserve-worker", passing=False, tags=["model=b:1"]) == []
    (entry,) = state.health_service("meshserve-worker", passing=False, tags=["model=a:1"])
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:w1"]


def test_only_real_changes_move_the_index(state: AgentState) -> None:
    register(state, TTL="5s")
    state.update_check("service:w1", "passing", "ok")
    before = state.service_view_index("meshserve-worker")
    state.update_check("service:w1", "passing", "ok")
    assert state.service_view_index("meshserve-worker") == before
    state.update_check("service:w1", "critical", "down")
    assert state.service_view_index("meshserve-worker") > before


def test_reregistering_keeps_the_check_status(state: AgentState) -> None:
    register(state, TTL="5s")
    state.update_check("service:w1", "passing", "ok")
    register(state, TTL="5s")  # e.g. new tags after a hot load
    assert passing_ids(state) == ["w1"]


def test_ttl_expiry_and_reaping(state: AgentState, clock: Clock) -> None:
    register(state, TTL="2s", DeregisterCriticalServiceAfter="3s")
    state.update_check("service:w1", "passing", "")
    clock.now += 1.9
    state.expire_ttls()
    assert passing_ids(state) == ["w1"]
    clock.now += 0.2
    state.expire_ttls()
    assert state.checks["service:w1"].status == "critical"
    assert state.checks["service:w1"].output == "TTL expired"
    clock.now += 2.9
    assert state.reap_critical() == []
    clock.now += 0.2
    assert state.reap_critical() == ["w1"]
    assert state.services == {} and state.checks == {}


def test_maintenance_drops_out_of_passing(state: AgentState) -> None:
    register(state, TTL="5s")
    state.update_check("service:w1", "passing", "")
    assert state.set_maintenance("w1", True, "draining")
    assert passing_ids(state) == []
    assert state.checks["_service_maintenance:w1"].notes == "draining"
    assert state.set_maintenance("w1", False, "")
    assert passing_ids(state) == ["w1"]
    assert not state.set_maintenance("nope", True, "")


def test_kv_cas_and_prefix_index(state: AgentState) -> None:
    assert state.kv_put("routes/a", b"1", 0, cas=0)
    assert not state.kv_put("routes/a", b"2", 0, cas=0)
    modify = state.kv["routes/a"].modify_index
    assert not state.kv_put("routes/a", b"2", 0, cas=modify + 100)
    assert state.kv_put("routes/a", b"2", 0, cas=modify)
    prefix_index = state.kv_view_index("routes/", recurse=True)
    state.kv_delete("routes/a", recurse=False, cas=None)
    # A delete must move the prefix's index, or a watcher would never see the key go.
    assert state.kv_view_index("routes/", recurse=True) > prefix_index
    assert state.kv_list("routes/") == []


async def test_wait_for_change_wakes_on_change_and_holds_otherwise(state: AgentState) -> None:
    index = state.kv_view_index("k", recurse=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await state.wait_for_change(lambda: state.kv_view_index("k", False), index, 0.2)
    assert loop.time() - started >= 0.19
    waiter = asyncio.create_task(state.wait_for_change(lambda: state.kv_view_index("k", False), index, 5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    state.kv_put("k", b"v", 0, None)
    await asyncio.wait_for(waiter, 1)
    # A client index from before an agent restart is ahead of ours: answer at once so it resets.
    await asyncio.wait_for(state.wait_for_change(lambda: state.kv_view_index("k", False), 10**6, 5), 1)
