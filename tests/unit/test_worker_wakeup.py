"""worker.wakeup: the batcher's queue-delay deadline fires on the loop, never before it is due, earliest first."""

from __future__ import annotations

import asyncio
import time

from worker.wakeup import Wakeup


async def test_fires_once_on_the_loop_and_not_before_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    done = asyncio.Event()

    def callback() -> None:
        fired.append(time.monotonic())
        done.set()

    wakeup = Wakeup(loop, callback)
    try:
        due = time.monotonic() + 0.02
        wakeup.at(due)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.05)
    finally:
        wakeup.close()
    assert len(fired) == 1
    assert fired[0] >= due


async def test_the_earliest_deadline_wins_and_close_stops_the_thread() -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    wakeup = Wakeup(loop, done.set)
    start = time.monotonic()
    try:
        wakeup.at(start + 30)
        wakeup.at(start + 0.01)
        await asyncio.wait_for(done.wait(), 5)  # long before the 30 s deadline
    finally:
        wakeup.close()
    assert not wakeup._thread.is_alive()
