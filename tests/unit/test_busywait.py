"""`meshserve.busywait`: waiting only while the event loop has other work ready."""

from __future__ import annotations

import asyncio
import contextlib
import time

from meshserve.busywait import BusyWait


async def arrivals(count: int, arrived: list[int]) -> None:
    """One arrival per loop iteration, as gRPC completions of incoming requests come."""
    for i in range(count):
        await asyncio.sleep(0)
        arrived.append(i)


async def test_an_idle_loop_does_not_wait() -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await BusyWait().while_busy(loop.time() + 5.0, lambda: False)
    assert time.monotonic() - started < 0.5


async def test_a_busy_loop_waits_until_enough() -> None:
    loop = asyncio.get_running_loop()
    arrived: list[int] = []
    producer = asyncio.create_task(arrivals(20, arrived))
    await BusyWait().while_busy(loop.time() + 5.0, lambda: len(arrived) >= 10)
    assert 10 <= len(arrived) <= 11  # the waiter resumes one loop iteration after its check saw enough
    await producer


async def test_a_busy_loop_waits_for_every_arrival_while_it_lasts() -> None:
    loop = asyncio.get_running_loop()
    arrived: list[int] = []
    producer = asyncio.create_task(arrivals(20, arrived))
    await BusyWait().while_busy(loop.time() + 5.0, lambda: False)
    assert len(arrived) == 20  # returned once the producer was done and the loop had nothing else
    await producer


async def test_a_loop_that_stays_busy_waits_no_longer_than_until() -> None:
    loop = asyncio.get_running_loop()
    spinning = asyncio.create_task(arrivals(10**9, []))
    started = time.monotonic()
    try:
        await BusyWait().while_busy(loop.time() + 0.05, lambda: False)
    finally:
        spinning.cancel()
    assert 0.04 < time.monotonic() - started < 2.0


async def test_waiters_on_an_idle_loop_do_not_keep_each_other_waiting() -> None:
    loop = asyncio.get_running_loop()
    shared = BusyWait()
    started = time.monotonic()
    await asyncio.gather(*(shared.while_busy(loop.time() + 5.0, lambda: False) for _ in range(3)))
    assert time.monotonic() - started < 0.5
    assert shared.active == 0


async def test_a_waiter_cancelled_while_busy_leaves_no_trace() -> None:
    loop = asyncio.get_running_loop()
    shared = BusyWait()
    spinning = asyncio.create_task(arrivals(10**9, []))
    await asyncio.sleep(0)  # the spinner is running: the loop is busy
    waiter = asyncio.create_task(shared.while_busy(loop.time() + 5.0, lambda: False))
    for _ in range(5):
        await asyncio.sleep(0)
    assert shared.active == 1
    waiter.cancel()
    spinning.cancel()
    for task in (waiter, spinning):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for _ in range(5):
        await asyncio.sleep(0)  # the check still queued runs and finds the waiter gone
    assert shared.active == 0
    started = time.monotonic()
    await shared.while_busy(loop.time() + 5.0, lambda: False)  # idle again: no wait
    assert time.monotonic() - started < 0.5
