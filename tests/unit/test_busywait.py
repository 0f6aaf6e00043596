"""`meshserve.busywait`: waiting only while the event loop has other work ready."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from meshserve.busywait import BusyWait, LightLoadPoll


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


# --------------------------------------------------------------------------
# LightLoadPoll
# --------------------------------------------------------------------------


def counting_polls(poll: LightLoadPoll) -> list[int]:
    """Counts the poll's loop iterations (its callback re-queues itself once per iteration)."""
    count = [0]
    original = poll._poll

    def counted(loop: asyncio.AbstractEventLoop) -> None:
        count[0] += 1
        original(loop)

    poll._poll = counted  # type: ignore[method-assign]
    return count


async def test_a_lone_request_keeps_the_loop_polling_for_the_window_then_it_sleeps() -> None:
    shared = BusyWait()
    poll = LightLoadPoll(shared, window_s=0.05)
    polls = counting_polls(poll)
    poll.started()
    assert poll.polling and shared.active == 1
    await asyncio.sleep(0.02)  # the loop has nothing else to do, yet keeps iterating
    assert polls[0] > 50
    poll.finished(0.001)
    await asyncio.sleep(0.1)  # past the window: the poll stops and the loop may sleep again
    assert not poll.polling and shared.active == 0
    settled = polls[0]
    await asyncio.sleep(0.02)
    assert polls[0] == settled


async def test_the_poll_does_not_count_as_work_for_busy_waiters() -> None:
    shared = BusyWait()
    poll = LightLoadPoll(shared, window_s=0.3)
    poll.started()
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await shared.while_busy(loop.time() + 5.0, lambda: False)  # an idle loop, bar the poll's own wake-up
    assert time.monotonic() - started < 0.2
    assert poll.polling
    poll.finished(0.001)
    await asyncio.sleep(0.5)
    assert not poll.polling and shared.active == 0


async def test_under_load_requests_do_not_start_a_poll() -> None:
    shared = BusyWait()
    poll = LightLoadPoll(shared, window_s=0.0, max_load=1.0)
    for _ in range(3):
        poll.started()
    await asyncio.sleep(3 * LightLoadPoll.LOAD_TIME_CONSTANT_S)  # three in flight for a while
    poll.window_s = 5.0
    poll.started()
    assert poll.load > 2.5
    assert not poll.polling and shared.active == 0
    for _ in range(4):
        poll.finished(0.001)
    assert poll.in_flight == 0


async def test_the_load_is_the_time_weighted_number_in_flight() -> None:
    poll = LightLoadPoll(BusyWait(), window_s=0.0)
    poll.started()
    poll.started()
    await asyncio.sleep(3 * LightLoadPoll.LOAD_TIME_CONSTANT_S)  # two in flight for three time constants
    poll.finished(0.001)
    assert 1.8 < poll.load < 2.0
    poll.finished(0.001)
    await asyncio.sleep(3 * LightLoadPoll.LOAD_TIME_CONSTANT_S)
    poll.started()  # accounts the idle stretch before counting itself
    assert poll.load < 0.3
    poll.finished(0.001)


async def test_a_request_slower_than_the_window_is_polled_for_until_after_its_expected_answer() -> None:
    shared = BusyWait()
    poll = LightLoadPoll(shared, window_s=0.02)
    for _ in range(30):  # a model that answers in 60 ms on average (under MAX_POLLED_DURATION_S here)
        poll.started()
        poll.finished(0.06)
    poll.MAX_POLLED_DURATION_S = 1.0
    await asyncio.sleep(3 * LightLoadPoll.LOAD_TIME_CONSTANT_S)  # idle again: the load falls under one
    poll.started()
    assert poll.polling
    await asyncio.sleep(0.04)  # past the window, still before the answer
    assert poll.polling
    await asyncio.sleep(0.07)  # past the expected answer plus half a window
    assert not poll.polling and shared.active == 0
    poll.finished(0.06)


async def test_requests_slower_than_the_polled_limit_do_not_start_a_poll() -> None:
    shared = BusyWait()
    poll = LightLoadPoll(shared, window_s=0.002)
    slow = LightLoadPoll.MAX_POLLED_DURATION_S * 2
    for _ in range(30):
        poll.started()
        poll.finished(slow)
    assert poll.duration_s > LightLoadPoll.MAX_POLLED_DURATION_S
    await asyncio.sleep(0.05)  # the first requests, still fast on average, polled for up to ~20 ms
    assert not poll.polling
    poll.started()
    assert not poll.polling and shared.active == 0
    poll.finished(slow)


async def test_each_polling_iteration_yields_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    yields = [0]
    monkeypatch.setattr(os, "sched_yield", lambda: yields.__setitem__(0, yields[0] + 1))
    poll = LightLoadPoll(BusyWait(), window_s=0.02)
    polls = counting_polls(poll)
    poll.started()
    await asyncio.sleep(0.01)
    assert yields[0] > 10 and yields[0] >= polls[0] - 1
    poll.finished(0.001)
