"""Discovery from fixed data: the same interfaces as the Consul watchers, for unit tests and static setups."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from registry.model import EndpointChange, ServiceInstance, diff_instances, index_by_id


class StaticDiscovery:
    """A `ServiceWatcher` look-alike: first batch is every instance as "added"; `set()` publishes changes."""

    stale = False

    def __init__(self, instances: Iterable[ServiceInstance] = ()) -> None:
        self._current = index_by_id(instances)
        self._pending: asyncio.Queue[list[EndpointChange]] = asyncio.Queue()
        self._pending.put_nowait(diff_instances({}, self._current))
        self._closed = False

    def set(self, instances: Iterable[ServiceInstance]) -> list[EndpointChange]:
        """Replaces the endpoint set; the watcher's consumers see the difference as one batch."""
        new = index_by_id(instances)
        changes = diff_instances(self._current, new)
        self._current = new
        if changes:
            self._pending.put_nowait(changes)
        return changes

    def snapshot(self) -> dict[str, ServiceInstance]:
        return dict(self._current)

    def __aiter__(self) -> StaticDiscovery:
        return self

    async def __anext__(self) -> list[EndpointChange]:
        if self._closed:
            raise StopAsyncIteration
        batch = await self._pending.get()
        if self._closed:
            raise StopAsyncIteration
        return batch

    async def close(self) -> None:
        self._closed = True
        self._pending.put_nowait([])  # wakes a consumer blocked in __anext__


class StaticKV:
    """A `KVWatcher` look-alike over a dict; `set()` publishes a new full snapshot."""

    stale = False

    def __init__(self, entries: Mapping[str, bytes] | None = None) -> None:
        self._current = dict(entries or {})
        self._pending: asyncio.Queue[dict[str, bytes]] = asyncio.Queue()
        self._pending.put_nowait(dict(self._current))
        self._closed = False

    def set(self, entries: Mapping[str, bytes]) -> None:
        self._current = dict(entries)
        self._pending.put_nowait(dict(self._current))

    def snapshot(self) -> dict[str, bytes]:
        return dict(self._current)

    def __aiter__(self) -> StaticKV:
        return self

    async def __anext__(self) -> dict[str, bytes]:
        if self._closed:
            raise StopAsyncIteration
        snapshot = await self._pending.get()
        if self._closed:
            raise StopAsyncIteration
        return snapshot

    async def close(self) -> None:
        self._closed = True
        self._pending.put_nowait({})
