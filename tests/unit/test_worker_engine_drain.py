"""The engine's side of a drain: refusals, and waiting until callers stop sending."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import grpc
import pytest

from protos import grpc_service_pb2 as pb
from worker.engine import DRAINING_MESSAGE, InferenceEngine
from worker.errors import InferenceError
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository


@pytest.fixture
def engine() -> InferenceEngine:
    # Refusing a request while draining comes before any model lookup: no repository is needed.
    return InferenceEngine(cast(ModelRepository, None), WorkerMetrics())


async def send_for(engine: InferenceEngine, seconds: float, every_s: float = 0.01) -> float:
    """Sends requests for `seconds`, each refused as draining; returns when the last one arrived."""
    request = pb.ModelInferRequest(model_name="mlp784")
    until = time.monotonic() + seconds
    while True:
        with pytest.raises(InferenceError) as refused:
            await engine.infer(request)
        assert (refused.value.code, str(refused.value)) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        last = time.monotonic()
        if last >= until:
            return last
        await asyncio.sleep(every_s)


async def test_quiet_comes_a_quiet_period_after_the_last_refused_request(engine: InferenceEngine) -> None:
    engine.begin_draining()
    sender = asyncio.create_task(send_for(engine, 0.3))
    assert await engine.wait_quiet(0.2, within=10.0)
    quiet_at = time.monotonic()
    last_arrival = await sender
    assert quiet_at >= last_arrival + 0.2
    assert engine.draining_refusals >= 2
    assert engine.in_flight == 0


async def test_quiet_comes_a_quiet_period_after_the_drain_began_when_nothing_arrives(engine: InferenceEngine) -> None:
    began = time.monotonic()
    engine.begin_draining()
    assert await engine.wait_quiet(0.05, within=10.0)
    assert time.monotonic() >= began + 0.05
    assert engine.draining_refusals == 0


async def test_callers_that_keep_sending_hold_the_quiet_back_only_within_the_limit(engine: InferenceEngine) -> None:
    engine.begin_draining()
    sender = asyncio.create_task(send_for(engine, 1.0, every_s=0.005))
    assert not await engine.wait_quiet(0.15, within=0.5)
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
