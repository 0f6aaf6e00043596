"""SIGTERM under load: every request in flight when the signal lands succeeds, and the worker exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ProcessGroup

pytestmark = pytest.mark.integration

CLIENTS = 32


async def test_sigterm_under_load_fails_no_request_in_flight(demo_repository: Path, processes: ProcessGroup) -> None:
    proc, address = processes.worker(
        demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "150", "--drain-delay", "0.5"
    )
    x = np.random.default_rng(1).random((1, 784), dtype=np.float32)
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, code)
    stop = asyncio.Event()

    async with triton_aio.InferenceServerClient(address) as client:

        async def one_client() -> None:
            while not stop.is_set():
                tensor = triton.InferInput("input", [1, 784], "FP32")
                tensor.set_data_from_numpy(x)
                sent = time.monotonic()
                try:
                    await client.infer("mlp784", [tensor], client_timeout=30)
                    code = "OK"
                except InferenceServerException as error:
                    code = error.status() or "connection"
                outcomes.append((sent, time.monotonic(), code))
                if code != "OK":
                    return  # the worker is going away; a balancer would go elsewhere

        clients = [asyncio.create_task(one_client()) for _ in range(CLIENTS)]
        await asyncio.sleep(1.0)
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(proc.popen.wait, 30)
        stop.set()
        await asyncio.gather(*clients)

    assert exit_code == 0
    in_flight = [o for o in outcomes if o[0] < signalled < o[1]]
    before = [o for o in outcomes if o[0] < signalled]
    assert len(in_flight) >= CLIENTS // 2, "the worker was not under load when signalled"
    assert all(code == "OK" for _, _, code in before), [o for o in before if o[2] != "OK"]
    # Requests sent after the signal are served (during the drain delay), refused as unavailable
    # (draining), or, when they reach gRPC while it closes the listener, cancelled by gRPC itself
    # before any handler saw them; never failed any other way.
    after = {code for sent, _, code in outcomes if sent >= signalled}
    assert after <= {"OK", "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "connection"}, after
    log = proc.output()
    assert "draining" in log and "drained and stopped" in log


async def test_requests_arriving_while_draining_are_refused_until_they_stop(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    """A caller that has not heard of the drain keeps sending after SIGTERM: each request gets the
    draining refusal (retryable elsewhere) until the caller stops; the gRPC server stops only then.
    Stopping it while requests still arrive lets them reach gRPC mid-shutdown: gRPC cancels them,
    or leaves one unanswered until the flush grace runs out."""
    proc, address = processes.worker(demo_repository, "--host", "127.0.0.1", "--drain-delay", "0")
    request = pb.ModelInferRequest(model_name="mlp784")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(np.zeros((1, 784), np.float32).tobytes())
    answers: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request, timeout=10)
        proc.signal(signal.SIGTERM)
        sending_until = time.monotonic() + 0.6
        while time.monotonic() < sending_until:
            try:
                await stub.ModelInfer(request, timeout=5)
                answers.append("OK")
            except grpc.aio.AioRpcError as error:
                draining = ("meshserve-draining", "1") in tuple(error.trailing_metadata() or ())
                answers.append(f"{error.code().name}{' (draining)' if draining else ''}: {error.details()}")
            await asyncio.sleep(0.01)  # far below the quiet period the worker waits for
        assert await asyncio.to_thread(proc.popen.wait, 10) == 0
    first_refused = next((index for index, answer in enumerate(answers) if answer != "OK"), len(answers))
    refused = answers[first_refused:]
    assert len(refused) >= 20, answers
    assert all(answer.startswith("UNAVAILABLE (draining): worker is draining") for answer in refused), refused
    assert f"refused {len(refused)} requests while draining" in proc.output()
