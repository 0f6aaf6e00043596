"""The client half of Consul's blocking queries, shared by the service and KV watchers.

Consul's rules: send the last `X-Consul-Index` with a `wait`; reset to 0 when the index goes
backwards (agent restart, snapshot restore); treat an index below 1 as 1; back off instead of
spinning when an answer comes back at once with the same index; when the agent cannot be reached,
keep the last data, say it is stale, retry with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import aiohttp
import consul

from registry.agent.durations import format_duration
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings

log = logging.getLogger(__name__)

T = TypeVar("T")
# fetch(index, wait) -> (new index, data); index 0 asks for an immediate answer.
Fetch = Callable[[int, str], Awaitable[tuple[int, T]]]
RegistryErrors = (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException, ValueError)


class Backoff:
    """Capped exponential backoff with full jitter on the upper half."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self._next = self.initial_s


class BlockingQuery(Generic[T]):
    """Repeats `fetch` as a blocking query; `next_change()` returns the data each time its index moves."""

    def __init__(
        self,
        name: str,
        fetch: Fetch[T],
        settings: RegistrySettings,
        metrics: RegistryMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.index = 0
        self.stale = False
        self._fetch = fetch
        self._settings = settings
        self._metrics = metrics
        self._sleep = sleep
        self._error_backoff = Backoff(settings.registry_backoff_initial_s, settings.registry_backoff_max_s)
        self._spin_backoff = Backoff(settings.registry_backoff_initial_s, settings.registry_backoff_max_s)

    async def next_change(self) -> T:
        """The data as of the next index change (the first call answers at once)."""
        wait_s = self._settings.registry_watch_wait_s
        wait = format_duration(wait_s)
        while True:
            asked = self.index
            started = time.monotonic()
            try:
                # Consul holds up to wait + wait/16 of jitter; past that (plus slack) the agent is not answering.
                async with asyncio.timeout(wait_s * 17 / 16 + self._settings.registry_request_timeout_s):
                    index, data = await self._fetch(asked, wait)
            except RegistryErrors as exc:
                self._mark_stale(exc)
                # The agent may have restarted meanwhile, and its new index may by chance equal the one held
                # here (the same workers re-registering in the same order do that): a blocking query would then
                # sit out a whole wait on data that may differ. So the first query after a failure does not block.
                self.index = 0
                await self._sleep(self._error_backoff.next_delay())
                continue
            self._mark_fresh()
            index = max(index, 1)
            if asked and index < asked:
                log.info("registry index went backwards; resetting", extra={"watch": self.name, "index": index})
                self.index = 0  # the data is current; the next query re-reads the index without blocking
                return data
            if asked and index == asked:
                if time.monotonic() - started < wait_s / 2:
                    # Answered at once with nothing new: never spin on an agent that does not block.
                    await self._sleep(self._spin_backoff.next_delay())
                else:
                    self._spin_backoff.reset()
                continue
            self._spin_backoff.reset()
            self.index = index
            return data

    def _mark_stale(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(self.name).inc()
        if not self.stale:
            self.stale = True
            log.warning(
                "registry unreachable; keeping the last known data (stale)",
                extra={"watch": self.name, "error": f"{type(exc).__name__}: {exc}"},
            )
            if self._metrics is not None:
                self._metrics.stale.labels(self.name).set(1)

    def _mark_fresh(self) -> None:
        self._error_backoff.reset()
        if self.stale:
            self.stale = False
            log.info("registry reachable again; watch resumed", extra={"watch": self.name})
            if self._metrics is not None:
                self._metrics.stale.labels(self.name).set(0)
