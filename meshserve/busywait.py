"""Waiting for work that is already arriving: yield to the event loop while it has other callbacks ready.

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
