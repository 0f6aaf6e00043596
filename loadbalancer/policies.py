"""Balancing policies: each picks one usable endpoint of a set, skipping the ones already tried.

`p2c_ewma` and `least_request` compare two (or k) random candidates, so a pick
costs the same for 3 endpoints or 1000. `consistent_hash` walks a ring of
virtual nodes, so adding or removing one of N endpoints moves about 1/N of keys.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import weakref
from collections.abc import Callable, Collection
from typing import Protocol

from loadbalancer.discovery import EndpointSet
from loadbalancer.endpoint import Endpoint

# Random draws before a pick falls back to scanning the set: only needed when
# many members are ejected or already tried, which the ejection cap bounds.
_DRAWS = 8


class Policy(Protocol):
    name: str

    def pick(
        self, endpoints: EndpointSet, exclude: Collection[str], now: float, hash_key: str | None
    ) -> Endpoint | None: ...


def _usable(endpoint: Endpoint, exclude: Collection[str], now: float) -> bool:
    return endpoint.usable(now) and endpoint.id not in exclude


def _candidates(
    endpoints: EndpointSet, count: int, exclude: Collection[str], now: float, rng: random.Random
) -> list[Endpoint]:
    """Up to `count` distinct usable members drawn at random; O(count) unless most are unusable."""
    members = endpoints.members
    size = len(members)
    if size <= count:
        return [endpoint for endpoint in members if _usable(endpoint, exclude, now)]
    chosen: list[Endpoint] = []
    for _ in range(count + _DRAWS):
        endpoint = members[int(rng.random() * size)]
        if endpoint not in chosen and _usable(endpoint, exclude, now):
            chosen.append(endpoint)
            if len(chosen) == count:
                return chosen
    usable = [endpoint for endpoint in members if _usable(endpoint, exclude, now)]
    return usable if len(usable) <= count else rng.sample(usable, count)


class PowerOfTwoChoices:
    """Two random candidates; the one with the lower cost wins (cost: see `loadbalancer.load`)."""

    def __init__(self, name: str, cost: Callable[[Endpoint], float], choices: int, rng: random.Random) -> None:
        self.name = name
        self._cost = cost
        self._choices = choices
        self._rng = rng

    def pick(
        self, endpoints: EndpointSet, exclude: Collection[str], now: float, hash_key: str | None
    ) -> Endpoint | None:
        candidates = _candidates(endpoints, self._choices, exclude, now, self._rng)
        if not candidates:
            return None
        best = candidates[0]
        best_cost = self._cost(best)
        for candidate in candidates[1:]:
            cost = self._cost(candidate)
            # Ties go either way at random so equal endpoints share the load.
            if cost < best_cost or (cost == best_cost and self._rng.random() < 0.5):
                best, best_cost = candidate, cost
        return best


def p2c_ewma(rng: random.Random) -> PowerOfTwoChoices:
    return PowerOfTwoChoices("p2c_ewma", lambda endpoint: endpoint.load.cost(), 2, rng)


def least_request(choices: int, rng: random.Random) -> PowerOfTwoChoices:
    """Envoy's least_request: the fewest outstanding requests among `choices` random candidates."""
    return PowerOfTwoChoices("least_request", lambda endpoint: float(endpoint.load.outstanding()), choices, rng)


class RoundRobin:
    name = "round_robin"

    def pick(
        self, endpoints: EndpointSet, exclude: Collection[str], now: float, hash_key: str | None
    ) -> Endpoint | None:
        members = endpoints.members
        for _ in range(len(members)):
            endpoints.cursor = (endpoints.cursor + 1) % len(members)
            endpoint = members[endpoints.cursor]
            if _usable(endpoint, exclude, now):
                return endpoint
        return None


def _hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class _Ring:
    def __init__(self, members: list[Endpoint], virtual_nodes: int) -> None:
        points = [
            (_hash64(f"{endpoint.id}#{replica}"), endpoint) for endpoint in members for replica in range(virtual_nodes)
        ]
        points.sort(key=lambda point: point[0])
        self.hashes = [point for point, _ in points]
        self.owners = [endpoint for _, endpoint in points]


class ConsistentHash:
    """A hash ring with virtual nodes; the request's key picks the first usable owner clockwise.

    Requests without a key are spread by `fallback` (p2c_ewma).
    """

    name = "consistent_hash"

    def __init__(self, virtual_nodes: int, fallback: Policy) -> None:
        self._virtual_nodes = virtual_nodes
        self._fallback = fallback
        self._rings: weakref.WeakKeyDictionary[EndpointSet, tuple[int, _Ring]] = weakref.WeakKeyDictionary()

    def ring(self, endpoints: EndpointSet) -> _Ring:
        cached = self._rings.get(endpoints)
        if cached is None or cached[0] != endpoints.generation:
            cached = (endpoints.generation, _Ring(endpoints.members, self._virtual_nodes))
            self._rings[endpoints] = cached
        return cached[1]

    def pick(
        self, endpoints: EndpointSet, exclude: Collection[str], now: float, hash_key: str | None
    ) -> Endpoint | None:
        if hash_key is None or not endpoints.members:
            return self._fallback.pick(endpoints, exclude, now, hash_key)
        ring = self.ring(endpoints)
        start = bisect.bisect(ring.hashes, _hash64(hash_key))
        size = len(ring.owners)
        # Walk clockwise past unusable owners; each endpoint owns many points, so stop
        # after a full turn (only reached when nothing is usable).
        for step in range(size):
            endpoint = ring.owners[(start + step) % size]
            if _usable(endpoint, exclude, now):
                return endpoint
        return None


def build_policy(name: str, *, least_request_choices: int, virtual_nodes: int, rng: random.Random) -> Policy:
    if name == "p2c_ewma":
        return p2c_ewma(rng)
    if name == "least_request":
        return least_request(least_request_choices, rng)
    if name == "round_robin":
        return RoundRobin()
    if name == "consistent_hash":
        return ConsistentHash(virtual_nodes, p2c_ewma(rng))
    raise ValueError(f"unknown balancing policy {name!r}; use p2c_ewma, least_request, round_robin or consistent_hash")
