"""Hedged requests ("The Tail at Scale"): per-model latency quantiles, and the race of two attempts."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from loadbalancer.errors import is_retryable

T = TypeVar("T")


class LatencyTracker:
    """The recent successful latencies of one model; quantiles recomputed only when asked and stale."""

    def __init__(self, window: int, min_samples: int) -> None:
        self._window = window
        self._min_samples = min_samples
        self._samples: list[float] = []
        self._next = 0
        self._unsorted = 0  # samples since the cached quantiles
        self._quantiles: tuple[float, float] | None = None  # (p50, p95)

    def record(self, seconds: float) -> None:
        if len(self._samples) < self._window:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self._window
        self._unsorted += 1

    def _current(self) -> tuple[float, float] | None:
        if len(self._samples) < self._min_samples:
            return None
        if self._quantiles is None or self._unsorted >= max(len(self._samples) // 16, 1):
            ordered = sorted(self._samples)
            last = len(ordered) - 1
            self._quantiles = (ordered[last // 2], ordered[min(math.ceil(0.95 * len(ordered)) - 1, last)])
            self._unsorted = 0
        return self._quantiles

    def p50(self) -> float | None:
        """The typical latency (what another attempt needs to have a fair chance)."""
        current = self._current()
        return None if current is None else current[0]

    def p95(self) -> float | None:
        """The hedge delay."""
        current = self._current()
        return None if current is None else current[1]


async def _cancel(tasks: set[asyncio.Task[T]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def hedged(primary: Awaitable[T], delay_s: float, start_hedge: Callable[[], Awaitable[T] | None]) -> T:
    """Runs `primary`; if it has not answered after `delay_s`, races it against `start_hedge()`.

    The first success wins and the other attempt is cancelled. A non-retryable
    failure is an answer too. When both fail retryably the last failure is raised.
    """
    first = asyncio.ensure_future(primary)
    pending: set[asyncio.Task[T]] = {first}
    try:
        done, pending = await asyncio.wait(pending, timeout=delay_s)
        if done:
            return first.result()
        hedge = start_hedge()
        if hedge is None:
            pending = set()
            return await first
        pending = {first, asyncio.ensure_future(hedge)}
        last_error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None or not is_retryable(error):
                    return task.result()
                last_error = error
        assert last_error is not None
        raise last_error
    finally:
        await _cancel(pending)
