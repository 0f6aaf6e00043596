"""One worker as the balancer sees it: its connection, load, and ejection state."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from loadbalancer.load import EndpointLoad

if TYPE_CHECKING:
    from registry.model import ServiceInstance


class Connection(Protocol):
    """What a connector returns for an endpoint: anything the attempt function can use, closable."""

    async def close(self) -> None: ...


class EndpointState(enum.StrEnum):
    ACTIVE = "active"
    EJECTED = "ejected"  # outlier ejection; returns by itself
    DRAINING = "draining"  # the worker said it is draining; the registry will remove it
    UNLISTED = "unlisted"  # gone from the registry with the rest of its set: kept as last known
    REMOVED = "removed"  # gone from the registry; closed once its in-flight calls finish


class Endpoint:
    """A worker endpoint shared by every model-version set it serves."""

    def __init__(
        self,
        instance: ServiceInstance,
        connection: Connection,
        load: EndpointLoad,
        clock: Callable[[], float],
    ) -> None:
        self.id: str = instance.id
        self.target: str = instance.target
        self.instance = instance
        self.connection = connection
        self.load = load
        self._clock = clock
        self.consecutive_failures = 0
        self.ejections = 0  # ejections not yet forgiven; multiplies the next ejection time
        self.ejected_until = -math.inf
        self.returned_at = -math.inf
        self.draining = False
        self.removed = False
        self.unlisted_since: float | None = None

    @property
    def state(self) -> EndpointState:
        if self.removed:
            return EndpointState.REMOVED
        if self.draining:
            return EndpointState.DRAINING
        if self._clock() < self.ejected_until:
            return EndpointState.EJECTED
        if self.unlisted_since is not None:
            return EndpointState.UNLISTED
        return EndpointState.ACTIVE

    def usable(self, now: float) -> bool:
        return not (self.removed or self.draining) and now >= self.ejected_until

    def report_load(self, queue_depth: int, in_flight: int) -> None:
        """The worker's own load report (trailing metadata or stream response parameters)."""
        self.load.report(queue_depth, in_flight)

    def __repr__(self) -> str:
        return f"Endpoint({self.id!r}, {self.target}, {self.state.value})"
