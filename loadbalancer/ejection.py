"""Outlier ejection (Envoy's consecutive-failure detector).

After `consecutive_failures` failures in a row (UNAVAILABLE, a broken
connection, or a deadline overrun on an attempt that had a fair deadline), an
endpoint is ejected for `base_s x ejections` (capped at `max_s`) and comes back
by itself when that time is up. No set is ever left with more than
`max_percent` of its members ejected. An endpoint that behaves for a base
interval after returning has one ejection forgiven.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import grpc

from loadbalancer.discovery import EndpointSet
from loadbalancer.endpoint import Endpoint
from loadbalancer.errors import Failure

logger = logging.getLogger(__name__)


class OutlierDetector:
    def __init__(
        self,
        *,
        consecutive_failures: int,
        base_s: float,
        max_s: float,
        max_percent: float,
        deadline_floor_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._threshold = consecutive_failures
        self._base_s = base_s
        self._max_s = max_s
        self._max_percent = max_percent
        self._deadline_floor_s = deadline_floor_s
        self._clock = clock

    def counts_against(self, failure: Failure, allotted_s: float | None) -> bool:
        """Whether a failure says something about the endpoint rather than the request."""
        if failure.draining:
            return False  # a graceful stop, handled by taking the endpoint out of rotation
        if failure.connection or failure.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if failure.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # A caller's tiny deadline is not the worker's fault.
            return allotted_s is None or allotted_s >= self._deadline_floor_s
        return False

    def success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0
        if endpoint.ejections and self._clock() - endpoint.returned_at >= self._base_s:
            endpoint.ejections -= 1
            endpoint.returned_at = self._clock()

    def failure(self, endpoint: Endpoint, sets: Iterable[EndpointSet]) -> bool:
        """Counts a failure against `endpoint`; returns True when it was ejected now."""
        endpoint.consecutive_failures += 1
        now = self._clock()
        if endpoint.consecutive_failures < self._threshold or now < endpoint.ejected_until:
            return False
        sets = list(sets)
        if not all(self._may_eject(endpoint_set, now) for endpoint_set in sets):
            return False
        endpoint.ejections += 1
        duration = min(self._base_s * endpoint.ejections, self._max_s)
        endpoint.ejected_until = now + duration
        endpoint.returned_at = endpoint.ejected_until
        endpoint.consecutive_failures = 0
        logger.warning(
            "endpoint ejected",
            extra={"endpoint": endpoint.target, "seconds": duration, "ejections": endpoint.ejections},
        )
        return True

    def _may_eject(self, endpoint_set: EndpointSet, now: float) -> bool:
        size = len(endpoint_set)
        allowed = int(size * self._max_percent / 100.0)
        if size >= 2 and self._max_percent > 0:
            allowed = max(allowed, 1)  # a percentage below one member still allows ejecting one of several
        return endpoint_set.ejected_count(now) + 1 <= allowed
