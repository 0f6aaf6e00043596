"""Sub-millisecond wake-ups for the event loop, for the dynamic batcher's queue delay.

asyncio fires its timers from the selector's timeout, which epoll takes in
whole milliseconds, rounded up: on Linux a 300 us `asyncio.wait_for` returns
after ~1.1 ms. A `max_queue_delay_us` of a few hundred microseconds would wait
about a millisecond instead. `Wakeup` keeps the deadline in a thread that
sleeps with the OS's microsecond timeout and pokes the loop when it is due
(one self-pipe write, ~20 us), only when a wait actually runs out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable


class Wakeup:
    """Calls `callback` on `loop` at (shortly after) the earliest deadline given to `at`.

    Deadlines are `time.monotonic()` values, the clock of `loop.time()`. One
    deadline is pending at a time, the earliest asked for: a caller that
    wakes early and still needs its later deadline asks again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], name: str = "wakeup") -> None:
        self._loop = loop
        self._callback = callback
        self._due: float | None = None
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def at(self, when: float) -> None:
        with self._condition:
            if self._due is None or when < self._due:
                self._due = when
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        with self._condition:
            while not self._closed:
                due = self._due
                if due is None:
                    self._condition.wait()
                    continue
                remaining = due - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self._due = None
                try:
                    self._loop.call_soon_threadsafe(self._callback)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
