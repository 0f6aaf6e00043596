"""Balancing policies and endpoint sets, with simulated endpoints (no network)."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from loadbalancer.balancer import Balancer, ModelPolicy
from loadbalancer.discovery import EndpointSet
from loadbalancer.endpoint import Endpoint
from loadbalancer.load import EndpointLoad
from loadbalancer.policies import ConsistentHash, PowerOfTwoChoices, build_policy
from loadbalancer.settings import BalancerSettings
from registry.model import EndpointChange, ServiceInstance, model_tag


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SimConnection:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def instance(n: int, *models: str) -> ServiceInstance:
    tags = tuple(model_tag(*m.split(":")) for m in (models or ("digits:1",)))
    return ServiceInstance(id=f"w{n}", address="127.0.0.1", port=50000 + n, tags=(*tags, "meshserve"))


def added(*instances: ServiceInstance) -> list[EndpointChange]:
    return [EndpointChange("added", inst) for inst in instances]


def balancer(count: int, clock: FakeClock | None = None, **settings: object) -> Balancer:
    lb = Balancer(
        BalancerSettings(**settings),
        lambda _inst: SimConnection(),
        clock=clock or FakeClock(),
        rng=random.Random(7),
    )
    lb.apply(added(*(instance(n) for n in range(count))))
    return lb


def endpoint_set(count: int, clock: FakeClock) -> EndpointSet:
    members = EndpointSet("digits", "1")
    for n in range(count):
        members.add(Endpoint(instance(n), SimConnection(), EndpointLoad(0.005, 10.0, 1.0, clock), clock))
    return members


def picks(policy_name: str, count: int, rounds: int, hash_keys: bool = False) -> collections.Counter[str]:
    clock = FakeClock()
    members = endpoint_set(count, clock)
    policy = build_policy(policy_name, least_request_choices=2, virtual_nodes=100, rng=random.Random(1))
    seen: collections.Counter[str] = collections.Counter()
    for i in range(rounds):
        chosen = policy.pick(members, (), clock(), f"user-{i}" if hash_keys else None)
        assert chosen is not None
        seen[chosen.id] += 1
    return seen


def test_round_robin_takes_turns() -> None:
    assert set(picks("round_robin", 4, 400).values()) == {100}


@pytest.mark.parametrize("policy", ["p2c_ewma", "least_request", "consistent_hash"])
def test_equal_endpoints_share_the_load(policy: str) -> None:
    seen = picks(policy, 4, 4000, hash_keys=policy == "consistent_hash")
    assert len(seen) == 4
    assert min(seen.values()) > 0.6 * 1000 and max(seen.values()) < 1.4 * 1000


def test_p2c_picks_the_cheaper_of_two() -> None:
    clock = FakeClock()
    members = endpoint_set(2, clock)
    slow, fast = members.members
    slow.load.ewma.observe(0.100)
    fast.load.ewma.observe(0.001)
    policy = build_policy("p2c_ewma", least_request_choices=2, virtual_nodes=1, rng=random.Random(1))
    assert {policy.pick(members, (), clock(), None) for _ in range(50)} == {fast}


def test_least_request_avoids_busy_endpoints() -> None:
    clock = FakeClock()
    members = endpoint_set(2, clock)
    busy, idle = members.members
    busy.load.pending = 5
    idle.load.report(queue_depth=1, in_flight=1)
    policy = build_policy("least_request", least_request_choices=2, virtual_nodes=1, rng=random.Random(1))
    assert {policy.pick(members, (), clock(), None) for _ in range(50)} == {idle}


def test_a_workers_load_report_counts_while_fresh() -> None:
    clock = FakeClock()
    load = EndpointLoad(0.01, 10.0, report_ttl_s=1.0, clock=clock)
    load.pending = 3  # the attempt carrying the report, and two more of ours
    # in_flight counts the worker's queue too: eight accepted, six of them queued, two of the eight ours
    load.report(queue_depth=6, in_flight=8)
    load.pending = 0
    assert load.outstanding() == 6
    assert load.cost() == pytest.approx(0.01 * 7)
    load.report(queue_depth=6, in_flight=8)
    assert load.outstanding() == 8  # with nothing of ours pending, all eight are others' work
    clock.now += 2
    assert load.outstanding() == 0


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    clock = FakeClock()
    load = EndpointLoad(0.001, 10.0, 1.0, clock)
    load.ewma.observe(0.050)
    assert load.ewma.current() == pytest.approx(0.050)  # a peak is taken at once
    clock.now += 10
    load.ewma.observe(0.001)
    assert 0.001 < load.ewma.current() < 0.050 * 0.4  # then forgotten with time


def test_p2c_pick_looks_at_two_endpoints_however_many_there_are() -> None:
    """O(1) per pick: the cost of at most two endpoints is read, for 10 or 1000 endpoints."""
    for size in (10, 1000):
        clock = FakeClock()
        members = endpoint_set(size, clock)
        looked_at: list[Endpoint] = []

        def cost(endpoint: Endpoint, seen: list[Endpoint] = looked_at) -> float:
            seen.append(endpoint)
            return endpoint.load.cost()

        policy = PowerOfTwoChoices("p2c_ewma", cost, 2, random.Random(3))
        for _ in range(200):
            looked_at.clear()
            assert policy.pick(members, (), clock(), None) is not None
            assert len(looked_at) <= 2


def test_picks_skip_tried_and_ejected_endpoints() -> None:
    clock = FakeClock()
    members = endpoint_set(3, clock)
    first, second, third = members.members
    second.ejected_until = clock.now + 5
    for name in ("p2c_ewma", "least_request", "round_robin", "consistent_hash"):
        policy = build_policy(name, least_request_choices=2, virtual_nodes=50, rng=random.Random(1))
        for i in range(30):
            assert policy.pick(members, {first.id}, clock(), f"k{i}") is third
        assert policy.pick(members, {first.id, third.id}, clock(), "k") is None


def _owners(ring_policy: ConsistentHash, members: EndpointSet, keys: list[str], clock: FakeClock) -> dict[str, str]:
    return {key: ring_policy.pick(members, (), clock(), key).id for key in keys}  # type: ignore[union-attr]


def test_consistent_hash_moves_about_one_nth_of_keys() -> None:
    clock = FakeClock()
    members = endpoint_set(10, clock)
    ring_policy = ConsistentHash(
        100, build_policy("p2c_ewma", least_request_choices=2, virtual_nodes=1, rng=random.Random())
    )
    keys = [f"user-{i}" for i in range(5000)]
    before = _owners(ring_policy, members, keys, clock)
    assert _owners(ring_policy, members, keys, clock) == before  # stable

    members.add(Endpoint(instance(10), SimConnection(), EndpointLoad(0.005, 10.0, 1.0, clock), clock))
    grown = _owners(ring_policy, members, keys, clock)
    moved = [key for key in keys if grown[key] != before[key]]
    assert 0.5 / 11 < len(moved) / len(keys) < 1.6 / 11
    assert all(grown[key] == "w10" for key in moved)  # keys only move to the newcomer

    members.discard("w3")
    shrunk = _owners(ring_policy, members, keys, clock)
    moved = [key for key in keys if shrunk[key] != grown[key]]
    assert {grown[key] for key in moved} == {"w3"}  # only the leaver's keys move
    assert 0.5 / 11 < len(moved) / len(keys) < 1.6 / 11


def test_added_endpoints_start_at_their_peers_median_latency() -> None:
    clock = FakeClock()
    lb = balancer(3, clock)
    for endpoint, latency in zip(lb.endpoints("digits"), (0.010, 0.020, 0.300), strict=True):
        endpoint.load.ewma.observe(latency)
    lb.apply(added(instance(9)))
    newcomer = next(e for e in lb.endpoints("digits") if e.id == "w9")
    assert newcomer.load.ewma.raw == pytest.approx(0.020)


def test_endpoint_sets_follow_registry_changes() -> None:
    lb = balancer(0)
    lb.apply(added(instance(1, "digits:1", "digits:2"), instance(2, "digits:2", "resnet:1")))
    assert lb.versions("digits") == {"1", "2"}
    assert {e.id for e in lb.endpoints("digits", "2")} == {"w1", "w2"}
    assert {e.id for e in lb.endpoints("resnet")} == {"w2"}
    assert {e.target for e in lb.endpoints()} == {"127.0.0.1:50001", "127.0.0.1:50002"}

    lb.apply([EndpointChange("updated", instance(1, "digits:2"))])
    assert lb.versions("digits") == {"2"}
    lb.apply([EndpointChange("removed", instance(1))])
    assert {e.id for e in lb.endpoints("digits", "2")} == {"w2"}
    assert lb.versions("resnet") == {"1"}


def test_a_registry_update_that_empties_a_set_keeps_its_endpoints_as_last_known() -> None:
    clock = FakeClock()
    lb = balancer(0, clock, unlisted_ttl_s=30)
    lb.apply(added(instance(1, "digits:1", "resnet:1"), instance(2, "digits:1"), instance(3, "resnet:1")))
    # An agent restarted with an empty catalog: everything is "removed" at once.
    lb.apply([EndpointChange("removed", instance(n)) for n in (1, 2, 3)])
    assert lb.versions("digits") == {"1"} and lb.versions("resnet") == {"1"}
    assert {e.state.value for e in lb.endpoints()} == {"unlisted"}
    assert lb.metrics.registry.get_sample_value("meshserve_endpoints", {"model": "digits", "state": "unlisted"}) == 2

    # The workers register again one by one: a set listed again drops its unlisted members.
    lb.apply(added(instance(4, "digits:1")))
    assert {e.id for e in lb.endpoints("digits")} == {"w4"}
    assert {e.id for e in lb.endpoints("resnet")} == {"w1", "w3"}
    lb.apply(added(instance(3, "resnet:1")))  # the same worker, listed again
    assert {(e.id, e.state.value) for e in lb.endpoints("resnet")} == {("w3", "active")}

    # Removing one endpoint of a set that keeps others is an ordinary removal.
    lb.apply(added(instance(5, "digits:1")))
    lb.apply([EndpointChange("removed", instance(4))])
    assert {e.id for e in lb.endpoints("digits")} == {"w5"}

    # Nothing comes back: the last known endpoints go after the TTL.
    lb.apply([EndpointChange("removed", instance(5))])
    assert {e.state.value for e in lb.endpoints("digits")} == {"unlisted"}
    clock.now += 30
    lb.apply([])
    assert lb.versions("digits") == set()

    without = balancer(1, clock, unlisted_ttl_s=0)
    without.apply([EndpointChange("removed", instance(0))])
    assert without.versions("digits") == set()


async def test_added_endpoint_is_usable_at_once_and_removed_one_closes_after_its_calls() -> None:
    lb = Balancer(BalancerSettings(), lambda _inst: SimConnection())
    lb.apply(added(instance(1)))
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_attempt(endpoint: Endpoint, _remaining: float | None) -> str:
        started.set()
        await release.wait()
        return endpoint.id

    call = asyncio.create_task(lb.call("digits", "1", slow_attempt, timeout=5))
    await started.wait()
    (endpoint,) = lb.endpoints("digits")
    lb.apply([EndpointChange("removed", instance(1))])
    lb.apply(added(instance(2)))
    await asyncio.sleep(0.01)
    assert not endpoint.connection.closed  # type: ignore[attr-defined]
    assert lb.versions("digits") == {"1"}
    assert await lb.call("digits", "1", lambda ep, _r: _ready(ep.id), timeout=5) == "w2"

    release.set()
    assert await call == "w1"
    await asyncio.sleep(0.01)
    assert endpoint.connection.closed  # type: ignore[attr-defined]
    await lb.close()


async def _ready(value: str) -> str:
    return value


async def test_p2c_ewma_sends_measurably_less_traffic_to_a_slow_endpoint() -> None:
    async def share_to_slow(policy: str) -> float:
        # Real time: the latencies below are real sleeps.
        lb = Balancer(BalancerSettings(policy=policy), lambda _inst: SimConnection(), rng=random.Random(5))
        lb.apply(added(*(instance(n) for n in range(3))))
        served: collections.Counter[str] = collections.Counter()

        async def attempt(endpoint: Endpoint, _remaining: float | None) -> None:
            served[endpoint.id] += 1
            await asyncio.sleep(0.030 if endpoint.id == "w0" else 0.001)

        async def client(requests: int) -> None:
            for _ in range(requests):
                await lb.call("digits", "1", attempt, timeout=5)

        await asyncio.gather(*(client(50) for _ in range(6)))
        await lb.close()
        return served["w0"] / sum(served.values())

    round_robin = await share_to_slow("round_robin")
    p2c = await share_to_slow("p2c_ewma")
    assert round_robin == pytest.approx(1 / 3, abs=0.02)
    assert p2c < 0.15 < round_robin / 2


async def test_model_policy_overrides_the_default() -> None:
    lb = balancer(3)
    lb.set_model_policy("digits", ModelPolicy(policy="round_robin"))
    assert lb.model_policy("digits").policy == "round_robin"
    assert lb.model_policy("other").policy == "p2c_ewma"
    with pytest.raises(ValueError, match="unknown balancing policy"):
        lb.set_model_policy("digits", ModelPolicy(policy="random"))  # type: ignore[arg-type]
    order = [await lb.call("digits", "1", lambda ep, _r: _ready(ep.id), timeout=1) for _ in range(6)]
    assert order[:3] == order[3:] and len(set(order)) == 3


async def test_consistent_hash_keeps_a_key_on_one_endpoint_and_fails_over_when_it_is_down() -> None:
    lb = balancer(5, policy="consistent_hash", backoff_base_ms=0)

    async def owner_of(key: str) -> str:
        return await lb.call("digits", "1", lambda ep, _r: _ready(ep.id), timeout=1, hash_key=key)

    owners = {key: await owner_of(key) for key in "abcdefgh"}
    for key, owner in owners.items():
        assert await owner_of(key) == owner
    assert len(set(owners.values())) > 1

    down = owners["a"]

    async def owner_down(endpoint: Endpoint, _remaining: float | None) -> str:
        if endpoint.id == down:
            raise ConnectionRefusedError("connection refused")
        return endpoint.id

    assert await lb.call("digits", "1", owner_down, timeout=1, hash_key="a") != down
