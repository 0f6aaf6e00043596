"""SIGTERM to a gateway under load: it says NOT_SERVING and keeps serving for its drain delay, then
refuses new requests as draining (UNAVAILABLE, retryable elsewhere) while the ones in flight finish,
stops only once callers stop sending, ends open streams once they are answered, and exits 0."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ProcessGroup

pytestmark = pytest.mark.integration

CLIENTS = 8
DRAIN_DELAY_S = 0.6
REFUSING_FOR_S = 0.4  # how long the callers go on sending once refusals began, as if not yet told


def mlp784_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp784")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(np.zeros((1, 784), np.float32).tobytes())
    return request


def describe(error: grpc.aio.AioRpcError) -> str:
    draining = ("meshserve-draining", "1") in tuple(error.trailing_metadata() or ())
    return f"{error.code().name}{' (draining)' if draining else ''}: {error.details()}"


async def test_sigterm_serves_through_the_delay_then_refuses_until_callers_stop(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    _, registry_url = processes.registry()
    processes.worker(demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "100", registry_url=registry_url)
    gateway, address = processes.gateway(registry_url, "--drain-delay", str(DRAIN_DELAY_S))
    request = mlp784_request()
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
    refused_calls: set[str] = set()
    health_during_delay: list[str] = []
    stop_sending_at = float("inf")

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def caller() -> None:
            metadata = False  # every other call asks for the model's metadata, which is routed to a worker too
            while time.monotonic() < stop_sending_at:
                sent = time.monotonic()
                metadata = not metadata
                try:
                    if metadata:
                        await stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp784"), timeout=10)
                    else:
                        await stub.ModelInfer(request, timeout=10)
                    outcome = "OK"
                except grpc.aio.AioRpcError as error:
                    outcome = describe(error)
                outcomes.append((sent, time.monotonic(), outcome))
                if outcome != "OK":
                    refused_calls.add("ModelMetadata" if metadata else "ModelInfer")
                await asyncio.sleep(0.005)

        callers = [asyncio.create_task(caller()) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)
        assert any(outcome == "OK" for *_, outcome in outcomes), outcomes
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        await asyncio.sleep(DRAIN_DELAY_S / 3)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        health_during_delay.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)
        health_during_delay.append(f"ready={ready.ready}")
        stop_sending_at = signalled + DRAIN_DELAY_S + REFUSING_FOR_S
        await asyncio.gather(*callers)
        exit_code = await asyncio.to_thread(gateway.popen.wait, 20)

    assert exit_code == 0, gateway.output()[-3000:]
    assert health_during_delay == ["NOT_SERVING", "ready=False"]
    before = [o for o in outcomes if o[0] < signalled]
    in_flight = [o for o in before if o[1] > signalled]
    assert in_flight, "no request was in flight when the gateway was signalled"
    assert all(outcome == "OK" for *_, outcome in before), [o for o in before if o[2] != "OK"]
    # Sent well inside the delay: served, as any request the load balancers in front still send.
    inside_delay = [outcome for sent, _, outcome in outcomes if signalled <= sent < signalled + DRAIN_DELAY_S - 0.25]
    assert inside_delay and set(inside_delay) == {"OK"}, collections.Counter(inside_delay)
    refused = [outcome for *_, outcome in outcomes if outcome != "OK"]
    assert len(refused) >= CLIENTS, collections.Counter(outcome for *_, outcome in outcomes)
    # Never cancelled by a gRPC server stopping under them, never left waiting for it.
    assert set(refused) == {"UNAVAILABLE (draining): gateway is shutting down; retry the request on another gateway"}
    assert refused_calls == {"ModelInfer", "ModelMetadata"}
    assert max(answered - sent for sent, answered, _ in outcomes) < 2.0
    log = gateway.output()
    assert f"refused {len(refused)} requests while draining" in log, log[-3000:]


async def test_an_open_stream_is_answered_then_ended_cleanly(demo_repository: Path, processes: ProcessGroup) -> None:
    """A client holding a ModelStreamInfer stream open gets every answer, then the stream ends with
    OK; the gateway does not wait out its drain grace for the client to close it."""
    _, registry_url = processes.registry()
    processes.worker(demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "300", registry_url=registry_url)
    gateway, address = processes.gateway(registry_url, "--drain-delay", "0", "--drain-grace", "20")
    client_done = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for index in range(3):
            request = mlp784_request()
            request.id = f"r{index}"
            yield request
        await client_done.wait()  # the client never closes its side while the stream lasts

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests(), timeout=30)
        answers: list[str] = []
        async for reply in call:
            if not answers:  # the first answer is back: the other two are in flight
                signalled = time.monotonic()
                gateway.signal(signal.SIGTERM)
            answers.append(reply.error_message or reply.infer_response.id)
        ended_after = time.monotonic() - signalled
        code = await call.code()
        client_done.set()
        exit_code = await asyncio.to_thread(gateway.popen.wait, 20)

    assert sorted(answers) == ["r0", "r1", "r2"]
    assert code == grpc.StatusCode.OK
    assert ended_after < 5.0, f"the stream ended {ended_after:.1f}s after SIGTERM"
    assert exit_code == 0


# README, "Several gateways": what a client with more than one gateway address should use.
CLIENT_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "inference.GRPCInferenceService"},
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


async def test_a_client_following_gateway_health_loses_nothing_when_one_of_two_gateways_stops(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    """The stock tritonclient, given both gateways' addresses and the README's service config: client-side
    health checking moves its requests off the draining gateway during the drain delay, so none fails and
    the draining gateway has nothing to refuse."""
    _, registry_url = processes.registry()
    processes.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
    first, first_address = processes.gateway(registry_url, name="gateway-1")
    _, second_address = processes.gateway(registry_url, name="gateway-2")
    channel_args = [("grpc.service_config", json.dumps(CLIENT_SERVICE_CONFIG))]
    x = np.zeros((1, 784), np.float32)
    answered, failures = 0, collections.Counter[str]()
    stop = asyncio.Event()

    async with triton_aio.InferenceServerClient(
        f"ipv4:{first_address},{second_address}", channel_args=channel_args
    ) as client:

        async def caller() -> None:
            nonlocal answered
            tensor = triton.InferInput("input", [1, 784], "FP32")
            tensor.set_data_from_numpy(x)
            while not stop.is_set():
                try:
                    await client.infer("mlp784", [tensor], client_timeout=10)
                    answered += 1
                except InferenceServerException as error:
                    failures[f"{error.status()}: {error.message()}"] += 1

        callers = [asyncio.create_task(caller()) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)
        first.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(first.popen.wait, 20)
        before_end = answered
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*callers)

    assert exit_code == 0
    assert not failures, failures
    assert answered > before_end > 0  # the second gateway carried on
    assert "refused 0 requests while draining" in first.output()
