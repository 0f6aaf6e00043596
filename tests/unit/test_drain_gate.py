"""A drain's waits (`meshserve.drain.DrainGate`): requests in flight, then callers to stop sending;
and the worker engine's side of it, refusing every request once the drain began."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import grpc
import pytest

from meshserve.drain import QUIET_BEFORE_STOP_S, DrainGate
from protos import grpc_service_pb2 as pb
from worker.engine import DRAINING_MESSAGE, InferenceEngine
from worker.errors import InferenceError
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository

log = logging.getLogger(__name__)


async def send_for(gate: DrainGate, seconds: float, every_s: float = 0.01) -> float:
    """Refuses a request every `every_s` for `seconds`; returns when the last one arrived."""
    until = time.monotonic() + seconds
    while True:
        gate.refuse()
        last = time.monotonic()
        if last >= until:
            return last
        await asyncio.sleep(every_s)


async def test_quiet_comes_a_quiet_period_after_the_last_refused_request() -> None:
    gate = DrainGate()
    gate.begin()
    sender = asyncio.create_task(send_for(gate, 0.3))
    assert await gate.wait_quiet(0.2, within=10.0)
    quiet_at = time.monotonic()
    last_arrival = await sender
    assert quiet_at >= last_arrival + 0.2
    assert gate.refusals >= 2


async def test_quiet_comes_a_quiet_period_after_the_drain_began_when_nothing_arrives() -> None:
    gate = DrainGate()
    began = time.monotonic()
    gate.begin()
    assert await gate.wait_quiet(0.05, within=10.0)
    assert time.monotonic() >= began + 0.05
    assert gate.refusals == 0


async def test_callers_that_keep_sending_hold_the_quiet_back_only_within_the_limit() -> None:
    gate = DrainGate()
    gate.begin()
    sender = asyncio.create_task(send_for(gate, 1.0, every_s=0.005))
    assert not await gate.wait_quiet(0.15, within=0.5)
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender


async def test_idle_comes_when_the_last_request_in_flight_leaves() -> None:
    gate = DrainGate()
    assert await gate.wait_idle(0.0)
    gate.enter()
    gate.enter()
    assert not await gate.wait_idle(0.05)
    gate.leave()
    asyncio.get_running_loop().call_later(0.05, gate.leave)
    assert await gate.wait_idle(5.0)
    assert gate.in_flight == 0


async def test_settle_waits_for_requests_in_flight_then_for_callers_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    gate = DrainGate()
    gate.enter()
    gate.begin()
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, gate.leave)
    loop.call_later(0.15, gate.refuse)  # a caller not yet told, after the last answer
    started = time.monotonic()
    await gate.settle(started + 10.0, log)
    assert time.monotonic() - started >= 0.15 + QUIET_BEFORE_STOP_S
    assert not caplog.records


async def test_settle_gives_up_on_requests_in_flight_at_the_grace(caplog: pytest.LogCaptureFixture) -> None:
    gate = DrainGate()
    gate.enter()
    gate.begin()
    started = time.monotonic()
    await gate.settle(started + 0.1, log)
    assert time.monotonic() - started < 1.0
    assert "drain grace ran out with 1 requests in flight" in caplog.text


async def test_a_draining_engine_refuses_every_request_and_counts_it() -> None:
    # Refusing a request while draining comes before any model lookup: no repository is needed.
    engine = InferenceEngine(cast(ModelRepository, None), WorkerMetrics())
    engine.gate.begin()
    for _ in range(3):
        with pytest.raises(InferenceError) as refused:
            await engine.infer(pb.ModelInferRequest(model_name="mlp784"))
        assert (refused.value.code, str(refused.value)) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    assert engine.gate.refusals == 3
    assert engine.in_flight == 0
    assert engine.draining
