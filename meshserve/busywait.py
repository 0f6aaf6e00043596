"""Waiting for work that is already arriving: yield to the event loop while it has other callbacks ready;
and, at light load, polling instead of sleeping (`LightLoadPoll`).

A request reaches a batcher (worker) or a hop stream (gateway) only after
several event-loop iterations of gRPC completions. Under load, when one
request is queued, the loop's ready list holds the completions of the next
ones; letting them run first turns one-request batches and messages into
bursts, which costs every process on the path less per request. On an idle
loop the ready list is empty and nothing waits, so a lone request pays
nothing (one check).

asyncio has no public "is anything else ready" call; the ready deque of
`asyncio.BaseEventLoop` is the one place that knows. On a loop without it
(uvloop, say) `while_busy` returns at once: no waiting, never wrong answers.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable


class BusyWait:
    """One per event loop, shared by everything on it that waits this way.

    Each waiter keeps one wake-up of its own in the ready list, which is work
    but not arrivals: the count of active waiters lets two waiters on an idle
    loop see it as idle instead of keeping each other waiting.
    """

    def __init__(self) -> None:
        self.active = 0

    async def while_busy(self, until: float, enough: Callable[[], bool]) -> None:
        """Waits while other callbacks are ready, until `enough()` or the loop time `until`."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        # Running now, this waiter is not in the ready list; every other active waiter is, once.
        if ready is None or len(ready) <= self.active or enough():
            return
        # The check runs as a plain callback, once per loop iteration: several
        # times cheaper than a task stepping through `await asyncio.sleep(0)`.
        done = loop.create_future()

        def check() -> None:
            if done.done():  # the waiter was cancelled (and has left the count)
                return
            # Every active waiter has exactly one check in the ready list; this one was just taken out.
            if len(ready) >= self.active and not enough() and loop.time() < until:
                loop.call_soon(check)
            else:
                done.set_result(None)

        self.active += 1
        loop.call_soon(check)
        try:
            await done
        finally:
            self.active -= 1


class LightLoadPoll:
    """Keeps the event loop polling, not sleeping, while a request is out, at light load.

    An asyncio loop with nothing ready blocks in epoll, and whatever ends the
    wait (a worker's answer, a client's next request) first pays for the kernel
    waking the loop's thread and its idle core. At light load those wake-ups are
    much of what a gateway hop adds to a request's latency. While polling, one
    callback re-queues itself every loop iteration, so the loop selects with a
    zero timeout and runs each completion as soon as gRPC hands it over.

    How long: from each request's start until half a window after its answer
    is expected (the running average of request durations), and for at least
    `window_s`: the answer and, from a lone client, the next request both come
    inside. Polling over only the stretch around the expected answer was tried
    for a model that computes for 7 ms, and gained nothing: on 2 cores only
    polling for the whole request took the hop's wake-ups away. Requests that
    take longer than `MAX_POLLED_DURATION_S` on average are not polled for; a
    wake-up is a negligible part of their latency.

    Only while fewer than `max_load` requests are in flight on average
    (time-weighted over ~`LOAD_TIME_CONSTANT_S`: a lone client's requests, or
    sporadic traffic): busier, the loop has work anyway, and spinning would take
    the cores the worker and the clients need. Each polling iteration yields the
    CPU (`sched_yield`), so a thread the kernel wakes on the polling core runs
    first: without it, a poll that started mid-request made cnn's hop 1.4-1.9 ms
    worse, as if the woken thread waited for the scheduler's next tick.

    The poll keeps one wake-up in the ready list, as a `BusyWait` waiter does,
    and is counted among that loop's waiters so `while_busy` ignores it.
    """

    LOAD_TIME_CONSTANT_S = 0.1
    DURATION_WEIGHT = 0.2  # of the latest request in the running average of request durations
    MAX_POLLED_DURATION_S = 0.02  # a wake-up (~0.3 ms) is then under 2% of the request's latency

    def __init__(self, busy_wait: BusyWait, window_s: float, max_load: float = 1.0) -> None:
        self.busy_wait = busy_wait
        self.window_s = window_s
        self.max_load = max_load
        self.in_flight = 0
        self.load = 0.0  # time-weighted average of in_flight
        self.duration_s = 0.0  # running average of the requests' durations
        self.polling = False
        self._changed = 0.0  # loop time of the last change of in_flight
        self._until = 0.0

    def _account(self, now: float) -> None:
        elapsed = now - self._changed
        self._changed = now
        self.load += (1.0 - math.exp(-elapsed / self.LOAD_TIME_CONSTANT_S)) * (self.in_flight - self.load)

    def started(self) -> None:
        """A request came in (call `finished` when it is answered)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._account(now)
        self.in_flight += 1
        if self.load >= self.max_load or self.duration_s > self.MAX_POLLED_DURATION_S:
            return
        self._until = now + max(self.window_s, self.duration_s + self.window_s / 2)
        if not self.polling:
            self.polling = True
            self.busy_wait.active += 1
            loop.call_soon(self._poll, loop)

    def finished(self, duration_s: float) -> None:
        """The request that `started` took `duration_s` to answer."""
        self._account(asyncio.get_running_loop().time())
        self.in_flight -= 1
        self.duration_s += self.DURATION_WEIGHT * (duration_s - self.duration_s)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.load < self.max_load and loop.time() < self._until:
            os.sched_yield()
            loop.call_soon(self._poll, loop)
        else:
            self.polling = False
            self.busy_wait.active -= 1
