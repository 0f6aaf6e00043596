"""Discovery: watchers fed by Consul blocking queries (py-consul), and small KV helpers for writers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import consul.aio

from registry.blocking import BlockingQuery
from registry.metrics import RegistryMetrics
from registry.model import SERVICE_NAME, EndpointChange, ServiceInstance, diff_instances
from registry.settings import RegistrySettings
from registry.url import connect, parse_registry_url

log = logging.getLogger(__name__)


class WatchClosed(Exception):
    """Raised inside a watch whose `close()` was called; iteration then stops."""


class _Watch:
    """A lazily connected py-consul client (aiohttp sessions must be made inside the loop)."""

    def __init__(self, registry_url: str, settings: RegistrySettings | None) -> None:
        self._address = parse_registry_url(registry_url)
        self._settings = settings or RegistrySettings()
        self._client: consul.aio.Consul | None = None
        self._closed = False

    @property
    def client(self) -> consul.aio.Consul:
        if self._closed:
            raise WatchClosed("the watcher is closed")
        if self._client is None:
            self._client = connect(self._address)
        return self._client

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None


class ServiceWatcher(_Watch):
    """Passing instances of one service, as batches of `EndpointChange`.

    The first batch lists every current instance as "added" (possibly none); later batches carry only
    what changed. While the agent is unreachable, `stale` is True and `snapshot()` keeps the last set.
    """

    def __init__(
        self,
        registry_url: str,
        service: str = SERVICE_NAME,
        *,
        settings: RegistrySettings | None = None,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        super().__init__(registry_url, settings)
        self.service = service
        self._metrics = metrics
        self._instances: dict[str, ServiceInstance] = {}
        self._delivered_first = False
        self._query = BlockingQuery(f"service:{service}", self._fetch, self._settings, metrics)

    async def _fetch(self, index: int, wait: str) -> tuple[int, dict[str, ServiceInstance]]:
        raw_index, entries = await self.client.health.service(
            self.service, index=str(index) if index else None, wait=wait, passing=True
        )
        instances = [ServiceInstance.from_health_entry(entry) for entry in entries or []]
        return int(raw_index), {inst.id: inst for inst in instances}

    @property
    def stale(self) -> bool:
        return self._query.stale

    def snapshot(self) -> dict[str, ServiceInstance]:
        return dict(self._instances)

    def __aiter__(self) -> ServiceWatcher:
        return self

    async def __anext__(self) -> list[EndpointChange]:
        while not self._closed:
            try:
                current = await self._query.next_change()
            except (asyncio.CancelledError, Exception):
                # A request cut short by close() fails in whatever way aiohttp chooses: that is the end.
                if self._closed:
                    raise StopAsyncIteration from None
                raise
            changes = diff_instances(self._instances, current)
            self._instances = current
            if changes or not self._delivered_first:
                self._delivered_first = True
                if self._metrics is not None and changes:
                    self._metrics.updates.labels(self._query.name).inc(len(changes))
                return changes
        raise StopAsyncIteration


class KVWatcher(_Watch):
    """Every key under a prefix, as a full `{key: value}` snapshot after each change (first one at once)."""

    def __init__(
        self,
        registry_url: str,
        prefix: str,
        *,
        settings: RegistrySettings | None = None,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        super().__init__(registry_url, settings)
        self.prefix = prefix.lstrip("/")
        self._metrics = metrics
        self._snapshot: dict[str, bytes] | None = None
        self._query = BlockingQuery(f"kv:{self.prefix}", self._fetch, self._settings, metrics)

    async def _fetch(self, index: int, wait: str) -> tuple[int, dict[str, bytes]]:
        raw_index, entries = await self.client.kv.get(
            self.prefix, index=str(index) if index else None, wait=wait, recurse=True
        )
        return int(raw_index), {entry["Key"]: entry.get("Value") or b"" for entry in entries or []}

    @property
    def stale(self) -> bool:
        return self._query.stale

    def snapshot(self) -> dict[str, bytes]:
        return dict(self._snapshot or {})

    def __aiter__(self) -> KVWatcher:
        return self

    async def __anext__(self) -> dict[str, bytes]:
        while not self._closed:
            try:
                current = await self._query.next_change()
            except (asyncio.CancelledError, Exception):
                # A request cut short by close() fails in whatever way aiohttp chooses: that is the end.
                if self._closed:
                    raise StopAsyncIteration from None
                raise
            if current != self._snapshot:
                self._snapshot = current
                if self._metrics is not None:
                    self._metrics.updates.labels(self._query.name).inc()
                return dict(current)
        raise StopAsyncIteration


async def _with_client(registry_url: str, settings: RegistrySettings | None, call: Any) -> Any:
    settings = settings or RegistrySettings()
    client = connect(parse_registry_url(registry_url))
    try:
        async with asyncio.timeout(settings.registry_request_timeout_s):
            return await call(client)
    finally:
        await client.close()


async def kv_get(registry_url: str, key: str, *, settings: RegistrySettings | None = None) -> tuple[bytes | None, int]:
    """(value, ModifyIndex) of `key`; (None, 0) when absent. ModifyIndex feeds `kv_put(cas=...)`."""

    async def call(client: consul.aio.Consul) -> tuple[bytes | None, int]:
        _, entry = await client.kv.get(key.lstrip("/"))
        if entry is None:
            return None, 0
        return entry.get("Value") or b"", int(entry["ModifyIndex"])

    return await _with_client(registry_url, settings, call)


async def kv_put(
    registry_url: str, key: str, value: bytes | str, cas: int | None = None, *, settings: RegistrySettings | None = None
) -> bool:
    """Writes `key`; with `cas`, only if its ModifyIndex still equals `cas` (0: only if absent)."""

    async def call(client: consul.aio.Consul) -> bool:
        return bool(await client.kv.put(key.lstrip("/"), value, cas=cas))

    return await _with_client(registry_url, settings, call)


async def kv_delete(
    registry_url: str, key: str, *, recurse: bool = False, settings: RegistrySettings | None = None
) -> bool:
    async def call(client: consul.aio.Consul) -> bool:
        return bool(await client.kv.delete(key.lstrip("/"), recurse=recurse or None))

    return await _with_client(registry_url, settings, call)
