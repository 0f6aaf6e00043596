"""Endpoint sets per model version, kept current by the registry's endpoint changes.

An endpoint (one worker, one connection) belongs to the set of every model
version its `model=<name>:<version>` tags name. Added endpoints are usable at
once; removed ones leave every set at once and their connection is closed
after their in-flight calls finish.

One exception keeps a registry glitch from becoming an outage: when one batch
of changes would leave a set with no endpoint at all (an agent restarted with
an empty catalog, a broken ACL token, a watcher bug), those endpoints stay as
`unlisted` last-known endpoints. They serve (and fail over) as before until
the registry lists any endpoint of their sets again, or `unlisted_ttl_s` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from loadbalancer.endpoint import Connection, Endpoint, EndpointState
from loadbalancer.load import EndpointLoad

if TYPE_CHECKING:
    from registry.model import EndpointChange, ServiceInstance

logger = logging.getLogger(__name__)

SetKey = tuple[str, str]  # (model, version)
NEUTRAL_SAMPLE = 32  # peers whose median latency a new endpoint starts with


def model_versions(instance: ServiceInstance) -> set[SetKey]:
    """The (model, version) pairs an instance's `model=<name>:<version>` tags name."""
    return {(served.name, served.version) for served in instance.models}


class EndpointSet:
    """The endpoints serving one model version; O(1) add, remove and random access."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.members: list[Endpoint] = []
        self._index: dict[str, int] = {}
        self.generation = 0  # bumped on every membership change (policies cache on it)
        self.cursor = 0  # round robin position

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, endpoint_id: str) -> bool:
        return endpoint_id in self._index

    def add(self, endpoint: Endpoint) -> None:
        if endpoint.id in self._index:
            return
        self._index[endpoint.id] = len(self.members)
        self.members.append(endpoint)
        self.generation += 1

    def discard(self, endpoint_id: str) -> None:
        position = self._index.pop(endpoint_id, None)
        if position is None:
            return
        last = self.members.pop()
        if position < len(self.members):
            self.members[position] = last
            self._index[last.id] = position
        self.generation += 1

    def ejected_count(self, now: float) -> int:
        return sum(1 for endpoint in self.members if now < endpoint.ejected_until)


class EndpointSets:
    """All endpoints, by id and by model version."""

    def __init__(
        self,
        connector: Callable[[ServiceInstance], Connection],
        new_load: Callable[[float], EndpointLoad],
        default_latency_s: float,
        clock: Callable[[], float],
        unlisted_ttl_s: float = 0.0,
    ) -> None:
        self._unlisted_ttl_s = unlisted_ttl_s
        self.unlisted: dict[str, Endpoint] = {}
        self._connector = connector
        self._new_load = new_load
        self._default_latency_s = default_latency_s
        self._clock = clock
        self.by_id: dict[str, Endpoint] = {}
        self.sets: dict[SetKey, EndpointSet] = {}
        self._membership: dict[str, set[SetKey]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._unclosed: list[Endpoint] = []

    # -- registry events -------------------------------------------------

    def apply(self, changes: Iterable[EndpointChange]) -> None:
        changes = list(changes)
        keep = self._last_known(changes)
        for change in changes:
            kind = change.kind
            if kind == "removed":
                if change.instance.id in keep:
                    self._unlist(change.instance.id, keep[change.instance.id])
                else:
                    self._remove(change.instance.id)
            elif kind in ("added", "updated"):
                self._upsert(change.instance)
            else:
                logger.warning("ignoring endpoint change of unknown kind %r", kind)
        self.expire_unlisted()

    def _last_known(self, changes: list[EndpointChange]) -> dict[str, set[SetKey]]:
        """Removed endpoints that are the whole of some set after this batch, and those sets."""
        if self._unlisted_ttl_s <= 0:
            return {}
        removed = {change.instance.id for change in changes if change.kind == "removed"}
        if not removed:
            return {}
        refilled: set[SetKey] = set()
        for change in changes:
            if change.kind != "removed":
                refilled |= model_versions(change.instance)
        keep: dict[str, set[SetKey]] = {}
        for key in {key for endpoint_id in removed for key in self._membership.get(endpoint_id, ())}:
            members = self.sets[key].members
            listed = any(m.id not in removed and m.unlisted_since is None for m in members)
            if not listed and key not in refilled:
                for member in members:
                    if member.id in removed:
                        keep.setdefault(member.id, set()).add(key)
        return keep

    def _unlist(self, endpoint_id: str, keys: set[SetKey]) -> None:
        """Keeps an endpoint the registry dropped, in the sets it would have emptied only."""
        endpoint = self.by_id.get(endpoint_id)
        if endpoint is None:
            return
        for key in self._membership[endpoint_id] - keys:
            self._leave(endpoint, key)
        self._membership[endpoint_id] &= keys
        if endpoint.unlisted_since is not None:
            return
        endpoint.unlisted_since = self._clock()
        self.unlisted[endpoint_id] = endpoint
        logger.warning(
            "the registry no longer lists any endpoint of this endpoint's models; keeping it as last known",
            extra={"endpoint": endpoint.target, "seconds": self._unlisted_ttl_s},
        )

    def expire_unlisted(self) -> None:
        """Unlisted endpoints leave the sets that are listed again, and go after `unlisted_ttl_s`."""
        if not self.unlisted:
            return
        now = self._clock()
        for endpoint_id, endpoint in list(self.unlisted.items()):
            keys = self._membership[endpoint_id]
            for key in list(keys):
                if any(member.unlisted_since is None for member in self.sets[key].members):
                    self._leave(endpoint, key)
                    keys.discard(key)
            since = endpoint.unlisted_since if endpoint.unlisted_since is not None else now
            if not keys or now - since >= self._unlisted_ttl_s:
                self._remove(endpoint_id)

    def _upsert(self, instance: ServiceInstance) -> None:
        current = self.by_id.get(instance.id)
        if current is not None and current.target != instance.target:
            self._remove(instance.id)  # same id, new address: a different connection
            current = None
        wanted = model_versions(instance)
        if current is None:
            current = Endpoint(
                instance, self._connector(instance), self._new_load(self._neutral_latency(wanted)), self._clock
            )
            self.by_id[current.id] = current
            self._membership[current.id] = set()
            logger.info("endpoint added", extra={"endpoint": current.target, "models": sorted(map(":".join, wanted))})
        else:
            current.instance = instance
            # A re-announced endpoint is serving again (e.g. back from maintenance).
            current.draining = False
            current.unlisted_since = None
            self.unlisted.pop(current.id, None)
        had = self._membership[current.id]
        for key in had - wanted:
            self._leave(current, key)
        for key in wanted - had:
            self.sets.setdefault(key, EndpointSet(*key)).add(current)
        self._membership[current.id] = wanted

    def _remove(self, endpoint_id: str) -> None:
        endpoint = self.by_id.pop(endpoint_id, None)
        self.unlisted.pop(endpoint_id, None)
        if endpoint is None:
            return
        for key in self._membership.pop(endpoint_id, set()):
            self._leave(endpoint, key)
        endpoint.removed = True
        logger.info("endpoint removed", extra={"endpoint": endpoint.target, "in_flight": endpoint.load.pending})
        self.release(endpoint)

    def _leave(self, endpoint: Endpoint, key: SetKey) -> None:
        endpoint_set = self.sets.get(key)
        if endpoint_set is None:
            return
        endpoint_set.discard(endpoint.id)
        if not endpoint_set.members:
            del self.sets[key]

    def _neutral_latency(self, keys: set[SetKey]) -> float:
        """The median estimate of the peers a new endpoint joins: it neither starves nor gets flooded."""
        # A bounded sample keeps adding N endpoints O(N), not O(N^2).
        peers = [
            endpoint.load.ewma.raw
            for key in keys
            if key in self.sets
            for endpoint in self.sets[key].members[:NEUTRAL_SAMPLE]
        ]
        return statistics.median(peers) if peers else self._default_latency_s

    # -- closing ---------------------------------------------------------

    def release(self, endpoint: Endpoint) -> None:
        """Called when an attempt on `endpoint` ends: a removed endpoint closes with its last call."""
        if not endpoint.removed or endpoint.load.pending > 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._unclosed.append(endpoint)  # applied outside a loop: closed by close_all()
            return
        task = loop.create_task(self._close(endpoint))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(endpoint: Endpoint) -> None:
        try:
            await endpoint.connection.close()
        except Exception:
            logger.exception("closing the connection to %s failed", endpoint.target)

    async def close_all(self) -> None:
        for endpoint_id in list(self.by_id):
            self._remove(endpoint_id)
        unclosed, self._unclosed = self._unclosed, []
        for endpoint in unclosed:
            await self._close(endpoint)
        if self._closing:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._closing, return_exceptions=True)

    # -- views -------------------------------------------------------------

    def sets_of(self, endpoint: Endpoint) -> list[EndpointSet]:
        return [self.sets[key] for key in self._membership.get(endpoint.id, ()) if key in self.sets]

    def iter_endpoints(self, model: str | None = None, version: str | None = None) -> Iterator[Endpoint]:
        if model is None:
            yield from self.by_id.values()
            return
        seen: set[str] = set()
        for (set_model, set_version), endpoint_set in self.sets.items():
            if set_model != model or (version is not None and set_version != version):
                continue
            for endpoint in endpoint_set.members:
                if endpoint.id not in seen:
                    seen.add(endpoint.id)
                    yield endpoint

    def state_counts(self) -> Iterator[tuple[str, str, int]]:
        """(model, state, count) over every model's endpoints (a worker counts once per model)."""
        by_model: dict[str, dict[str, EndpointState]] = {}
        for (model, _version), endpoint_set in self.sets.items():
            states = by_model.setdefault(model, {})
            for endpoint in endpoint_set.members:
                states[endpoint.id] = endpoint.state
        for model, states in by_model.items():
            for state in EndpointState:
                if state is not EndpointState.REMOVED:
                    yield model, state.value, sum(1 for s in states.values() if s is state)
