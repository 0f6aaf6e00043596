"""The plain interfaces the balancer, gateway and worker code against, whatever feeds them
(Consul watchers, the static test doubles in `registry.static`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from registry.model import EndpointChange, ServiceInstance


@runtime_checkable
class EndpointSource(Protocol):
    """Async iterator of endpoint change batches; the first batch is the whole current set."""

    @property
    def stale(self) -> bool: ...

    def snapshot(self) -> dict[str, ServiceInstance]: ...

    def __aiter__(self) -> EndpointSource: ...

    async def __anext__(self) -> list[EndpointChange]: ...

    async def close(self) -> None: ...


@runtime_checkable
class ConfigSource(Protocol):
    """Async iterator of full `{key: value}` snapshots of a KV prefix."""

    @property
    def stale(self) -> bool: ...

    def snapshot(self) -> dict[str, bytes]: ...

    def __aiter__(self) -> ConfigSource: ...

    async def __anext__(self) -> dict[str, bytes]: ...

    async def close(self) -> None: ...


@runtime_checkable
class Registrar(Protocol):
    """Register / heartbeat / re-register / deregister one service (the worker's side)."""

    async def start(self) -> None: ...

    async def set_tags(self, tags: list[str]) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...
