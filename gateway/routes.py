"""Which version of a model serves a request: routing config from Consul KV.

`meshserve/routes/<model>` holds JSON::

    {"weights": {"1": 90, "2": 10},        # canary; {"2": 100} pins version 2
     "policy": "consistent_hash",          # optional balancer policy for the model
     "hash_header": "x-user",              # optional, with consistent_hash
     "hedge": false,                       # optional
     "previous": {"weights": {"1": 100}}}  # what `meshserve model rollback` restores

Resolution: a version named by the client is served exactly (NOT_FOUND when no
worker serves it); otherwise the route's weights pick among the versions that
workers serve; without a route (or when none of its versions is served) the
newest served version answers.

Writers (`meshserve model rollout|rollback`, `MeshAdmin.SetRoute`) plan the new
route here and write it with `write_route`, a check-and-set on the key.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class RouteConflict(ValueError):
    """The route changed in the registry between reading it and writing the new one."""


class RouteError(LookupError):
    """No version of the model can serve the request (maps to NOT_FOUND)."""


@dataclass(frozen=True)
class Route:
    weights: Mapping[str, int] = field(default_factory=dict)
    policy: str | None = None
    hash_header: str | None = None
    hedge: bool = False
    previous: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> Route:
        raw = json.loads(data) if isinstance(data, bytes | str) else data
        if not isinstance(raw, dict):
            raise ValueError("a route is a JSON object with 'weights'")
        weights = raw.get("weights") or {}
        if not isinstance(weights, dict):
            raise ValueError("'weights' must map versions to integer weights")
        parsed: dict[str, int] = {}
        for version, weight in weights.items():
            weight = int(weight)
            if weight < 0:
                raise ValueError(f"weight of version {version} is negative")
            parsed[str(version)] = weight
        hash_header = raw.get("hash_header")
        return cls(
            weights=parsed,
            policy=raw.get("policy"),
            hash_header=hash_header.lower() if isinstance(hash_header, str) else None,
            hedge=bool(raw.get("hedge", False)),
            previous=raw.get("previous"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": dict(self.weights)}
        if self.policy:
            out["policy"] = self.policy
        if self.hash_header:
            out["hash_header"] = self.hash_header
        if self.hedge:
            out["hedge"] = True
        if self.previous is not None:
            out["previous"] = dict(self.previous)
        return out


def version_order(version: str) -> tuple[int, int | str]:
    """Sort key: numeric versions by value, anything else after them by name."""
    return (0, int(version)) if version.isdigit() else (1, version)


def newest(versions: set[str] | frozenset[str]) -> str:
    return max(versions, key=version_order)


class _Picker:
    """Weighted choice among versions, precomputed so a pick is one bisect."""

    __slots__ = ("_cumulative", "_total", "_versions")

    def __init__(self, weights: Mapping[str, int]) -> None:
        self._versions: list[str] = []
        self._cumulative: list[int] = []
        total = 0
        for version, weight in weights.items():
            if weight > 0:
                total += weight
                self._versions.append(version)
                self._cumulative.append(total)
        self._total = total

    def pick(self, rng: Callable[[], float]) -> str | None:
        if not self._versions:
            return None
        if len(self._versions) == 1:
            return self._versions[0]
        return self._versions[bisect.bisect_right(self._cumulative, rng() * self._total)]


class RouteTable:
    """Routes per model, resolved against the versions workers serve right now.

    `served(model)` is the balancer's view (versions with at least one endpoint);
    call `endpoints_changed()` whenever it changes so cached picks are rebuilt.
    """

    def __init__(self, served: Callable[[str], set[str]], rng: Callable[[], float] = random.random) -> None:
        self._served = served
        self._rng = rng
        self._routes: dict[str, Route] = {}
        self._pickers: dict[str, tuple[frozenset[str], _Picker | None, str | None]] = {}

    def route(self, model: str) -> Route | None:
        return self._routes.get(model)

    @property
    def routes(self) -> Mapping[str, Route]:
        return self._routes

    def replace(self, routes: Mapping[str, Route]) -> None:
        self._routes = dict(routes)
        self._pickers = {}

    def endpoints_changed(self) -> None:
        self._pickers = {}

    def resolve(self, model: str, requested: str = "") -> str:
        """The version that serves this request; raises RouteError when none can."""
        entry = self._pickers.get(model)
        if entry is None:
            entry = self._pickers[model] = self._build(model)
        served, picker, fallback = entry
        if requested:
            if requested in served:
                return requested
            if not served:
                raise RouteError(f"model {model!r} is not served by any worker")
            available = ", ".join(sorted(served, key=version_order))
            raise RouteError(f"model {model!r} version {requested!r} is not served (available: {available})")
        if picker is not None:
            version = picker.pick(self._rng)
            if version is not None:
                return version
        if fallback is None:
            raise RouteError(f"model {model!r} is not served by any worker")
        return fallback

    def _build(self, model: str) -> tuple[frozenset[str], _Picker | None, str | None]:
        served = frozenset(self._served(model))
        route = self._routes.get(model)
        picker = None
        if route is not None:
            live = {v: w for v, w in route.weights.items() if v in served}
            if live:
                picker = _Picker(live)
            elif route.weights:
                log.warning(
                    "no version of the route is served; the newest version answers",
                    extra={"model": model, "route": json.dumps(route.to_json())},
                )
        return served, picker, newest(served) if served else None


def parse_routes(snapshot: Mapping[str, bytes], prefix: str) -> dict[str, Route]:
    """Routes from a KV snapshot `{key: value}`; invalid entries are logged and skipped."""
    routes: dict[str, Route] = {}
    for key, value in snapshot.items():
        model = key[len(prefix) :] if key.startswith(prefix) else key
        if not model or value is None:
            continue
        try:
            routes[model] = Route.from_json(value)
        except (ValueError, TypeError) as exc:
            log.error("ignoring invalid route %s: %s", key, exc, extra={"model": model})
    return routes


def rollout(current: Route | None, version: str, weight: int, stable: str | None = None) -> Route:
    """The route after sending `weight`% of traffic to `version`.

    The other versions of the current route share the rest in their current
    proportions; without a current route `stable` gets the rest. The current
    route (without its own history) becomes `previous`, so one rollback undoes
    this step.
    """
    if not 0 < weight <= 100:
        raise ValueError("weight must be between 1 and 100")
    previous_weights = dict(current.weights) if current and current.weights else {}
    if not previous_weights and stable is not None:
        previous_weights = {stable: 100}
    others = {v: w for v, w in previous_weights.items() if v != version and w > 0}
    if weight < 100 and not others:
        raise ValueError(f"no other version to keep {100 - weight}% of the traffic; use --weight 100 to pin {version}")
    weights = {version: weight}
    rest = 100 - weight
    total = sum(others.values())
    assigned = 0
    for index, (other, share) in enumerate(sorted(others.items(), key=lambda item: version_order(item[0]))):
        portion = rest - assigned if index == len(others) - 1 else round(rest * share / total)
        assigned += portion
        if portion > 0:
            weights[other] = portion
    previous = Route(
        weights=previous_weights,
        policy=current.policy if current else None,
        hash_header=current.hash_header if current else None,
        hedge=current.hedge if current else False,
    ).to_json()
    return Route(
        weights=weights,
        policy=current.policy if current else None,
        hash_header=current.hash_header if current else None,
        hedge=current.hedge if current else False,
        previous=previous,
    )


def rollback(current: Route | None) -> Route:
    """The route before the last rollout; raises ValueError when there is none."""
    if current is None or current.previous is None:
        raise ValueError("nothing to roll back: the route has no previous state")
    return Route.from_json({**current.previous, "previous": None})


def with_weights(current: Route | None, weights: Mapping[str, int]) -> Route:
    """The route with `weights` set outright (`MeshAdmin.SetRoute`); like `rollout`, the current route
    (or, with none, "newest version serves") becomes `previous`, so one rollback undoes it."""
    planned = Route.from_json({"weights": dict(weights)})  # the same checks as a route read from the registry
    if not any(planned.weights.values()):
        raise ValueError("a route needs at least one version with a positive weight")
    keep = current or Route()
    previous = Route(weights=keep.weights, policy=keep.policy, hash_header=keep.hash_header, hedge=keep.hedge)
    return Route(
        weights=planned.weights,
        policy=keep.policy,
        hash_header=keep.hash_header,
        hedge=keep.hedge,
        previous=previous.to_json(),
    )


async def read_route(registry_url: str, prefix: str, model: str) -> tuple[Route | None, int]:
    """The model's route in the registry (None when it has none) and the key's index, for `write_route`."""
    from registry.discovery import kv_get

    value, index = await kv_get(registry_url, prefix + model)
    return (Route.from_json(value) if value is not None else None), index


async def write_route(registry_url: str, prefix: str, model: str, route: Route, index: int) -> None:
    """Writes the route only if the key is as `read_route` found it; RouteConflict if it changed meanwhile."""
    from registry.discovery import kv_put

    if not await kv_put(registry_url, prefix + model, json.dumps(route.to_json()), cas=index):
        raise RouteConflict(f"the route of {model} changed while this ran; try again")
