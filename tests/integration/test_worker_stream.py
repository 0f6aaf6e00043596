"""The gateway -> worker hop on a worker: ModelStreamInfer and the batched WorkerHop/InferStream: ids,
concurrency, coalesced replies, per-request deadlines, draining."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from protos import mesh_pb2, mesh_pb2_grpc
from tests.harness import ProcessGroup, grpc_serving

pytestmark = pytest.mark.integration

OK, DEADLINE_EXCEEDED, UNAVAILABLE = 0, 4, 14


def request(
    model: str, x: np.ndarray, request_id: str, deadline_ms: int | None = None
) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    if deadline_ms is not None:
        message.parameters["meshserve.deadline_ms"].int64_param = deadline_ms
    return message


class Stream:
    """One ModelStreamInfer call: send requests any time, collect responses by id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._outgoing: asyncio.Queue[service_pb2.ModelInferRequest | None] = asyncio.Queue()
        self.call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(self._requests())
        self.order: list[str] = []

    async def _requests(self) -> AsyncIterator[service_pb2.ModelInferRequest]:
        while (item := await self._outgoing.get()) is not None:
            yield item

    def send(self, message: service_pb2.ModelInferRequest) -> None:
        self._outgoing.put_nowait(message)

    def close(self) -> None:
        self._outgoing.put_nowait(None)

    async def receive(self, count: int) -> dict[str, service_pb2.ModelStreamInferResponse]:
        replies = {}
        for _ in range(count):
            reply = await asyncio.wait_for(self.call.read(), 60)
            assert reply is not grpc.aio.EOF
            self.order.append(reply.infer_response.id)
            replies[reply.infer_response.id] = reply
        return replies


async def in_flight(channel: grpc.aio.Channel) -> int:
    """The requests the worker holds, read from the load report that even a refused call carries
    (a request for an unknown model is refused at once and is not counted itself)."""
    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        service_pb2.ModelInferRequest(model_name="probe")
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    return int(dict(await call.trailing_metadata())["meshserve-in-flight"])


async def until_in_flight(channel: grpc.aio.Channel, count: int) -> None:
    """Waits until the worker holds at least `count` requests."""
    for _ in range(200):
        if await in_flight(channel) >= count:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the worker never held {count} requests")


def status_of(reply: service_pb2.ModelStreamInferResponse) -> int:
    params = reply.infer_response.parameters
    return params["meshserve.status_code"].int64_param if "meshserve.status_code" in params else OK


async def test_requests_on_one_stream_run_concurrently_and_echo_ids(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    rng = np.random.default_rng(5)
    sessions = {m: ort.InferenceSession(str(demo_repository / m / "1" / "model.onnx")) for m in ("cnn", "digits")}
    # A slow CNN batch first, then quick digits requests: the quick ones overtake it.
    sent = [("slow", "cnn", rng.random((32, 1, 64, 64), dtype=np.float32))]
    sent += [(f"quick-{i}", "digits", rng.random((1 + i % 3, 64), dtype=np.float32) * 16) for i in range(20)]
    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream(channel)
        for request_id, model, x in sent:
            stream.send(request(model, x, request_id))
        replies = await stream.receive(len(sent))
        stream.close()
        assert await stream.call.code() == grpc.StatusCode.OK
    assert stream.order[-1] == "slow", "the stream was processed one request at a time"
    for request_id, model, x in sent:
        reply = replies[request_id]
        assert reply.error_message == ""
        response = reply.infer_response
        assert response.model_name == model
        assert response.parameters["meshserve.in_flight"].int64_param >= 0
        assert response.parameters["meshserve.queue_depth"].int64_param >= 0
        index = [o.name for o in response.outputs].index("probabilities")
        got = np.frombuffer(response.raw_output_contents[index], dtype=np.float32).reshape(x.shape[0], 10)
        expected = sessions[model].run(["probabilities"], {"input": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


async def test_errors_on_a_stream_name_their_request(demo_repository: Path, processes: ProcessGroup) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream(channel)
        stream.send(request("digits", np.ones((1, 63), np.float32), "bad-shape"))
        stream.send(request("nope", np.ones((1, 64), np.float32), "bad-model"))
        stream.send(request("digits", np.ones((1, 64), np.float32), "good"))
        replies = await stream.receive(3)
        stream.close()
    assert status_of(replies["bad-shape"]) == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "expected shape [-1, 64], got [1, 63]" in replies["bad-shape"].error_message
    assert status_of(replies["bad-model"]) == grpc.StatusCode.NOT_FOUND.value[0]
    assert replies["good"].error_message == "" and status_of(replies["good"]) == OK


async def test_deadline_passed_is_dropped_and_draining_is_answered(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    proc, address = processes.worker(
        demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "400", "--drain-delay", "0"
    )
    x = np.ones((1, 64), np.float32)
    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream(channel)
        # 400 ms of injected latency: a 50 ms budget is spent before the model runs.
        stream.send(request("digits", x, "late", deadline_ms=50))
        stream.send(request("digits", x, "in-time", deadline_ms=30_000))
        for i in range(4):
            stream.send(request("digits", x, f"in-flight-{i}"))
        await until_in_flight(channel, 6)
        drained = await mesh_pb2_grpc.MeshAdminStub(channel).DrainWorker(mesh_pb2.DrainWorkerRequest(), timeout=5)
        assert drained.in_flight == 6
        stream.send(request("digits", x, "after-drain"))
        unary = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request("digits", x, "unary"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details().startswith("worker is draining")
        assert ("meshserve-draining", "1") in tuple(refused.value.trailing_metadata())
        assert not grpc_serving(address)
        replies = await stream.receive(7)
        # The draining worker ends the stream once its requests are answered.
        assert await asyncio.wait_for(stream.call.read(), 10) is grpc.aio.EOF
        assert await stream.call.code() == grpc.StatusCode.OK
    assert status_of(replies["late"]) == DEADLINE_EXCEEDED
    assert status_of(replies["in-time"]) == OK
    for i in range(4):
        assert status_of(replies[f"in-flight-{i}"]) == OK
    refusal = replies["after-drain"]
    assert status_of(refusal) == UNAVAILABLE
    assert refusal.error_message.startswith("worker is draining")
    assert refusal.infer_response.parameters["meshserve.draining"].bool_param
    assert proc.popen.wait(timeout=20) == 0


class Hop:
    """One WorkerHop/InferStream call, as the gateway uses it: batches of requests out, batches of replies back."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._outgoing: asyncio.Queue[mesh_pb2.InferBatch | None] = asyncio.Queue()
        self.call = mesh_pb2_grpc.WorkerHopStub(channel).InferStream(self._batches())
        self.messages: list[list[service_pb2.ModelStreamInferResponse]] = []

    async def _batches(self) -> AsyncIterator[mesh_pb2.InferBatch]:
        while (item := await self._outgoing.get()) is not None:
            yield item

    def send(self, *requests: service_pb2.ModelInferRequest | bytes) -> None:
        raw = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
        self._outgoing.put_nowait(mesh_pb2.InferBatch(requests=raw))

    def close(self) -> None:
        self._outgoing.put_nowait(None)

    async def receive(self, count: int) -> dict[str, service_pb2.ModelStreamInferResponse]:
        replies: dict[str, service_pb2.ModelStreamInferResponse] = {}
        while len(replies) < count:
            message = await asyncio.wait_for(self.call.read(), 60)
            assert message is not grpc.aio.EOF
            entries = [service_pb2.ModelStreamInferResponse.FromString(raw) for raw in message.responses]
            self.messages.append(entries)
            replies.update((entry.infer_response.id, entry) for entry in entries)
        return replies


async def test_hop_answers_a_batch_by_id_and_coalesces_replies(demo_repository: Path, processes: ProcessGroup) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    rng = np.random.default_rng(11)
    session = ort.InferenceSession(str(demo_repository / "digits" / "1" / "model.onnx"))
    sent = {f"r{i}": rng.random((1 + i % 2, 64), dtype=np.float32) * 16 for i in range(16)}
    async with grpc.aio.insecure_channel(address) as channel:
        hop = Hop(channel)
        hop.send(
            *(request("digits", x, request_id) for request_id, x in sent.items()), request("nope", sent["r0"], "bad")
        )
        replies = await hop.receive(len(sent) + 1)
        hop.close()
        assert await hop.call.code() == grpc.StatusCode.OK
    assert sorted(replies) == sorted([*sent, "bad"])
    assert status_of(replies["bad"]) == grpc.StatusCode.NOT_FOUND.value[0]
    for request_id, x in sent.items():
        reply = replies[request_id]
        assert reply.error_message == "" and status_of(reply) == OK
        response = reply.infer_response
        assert response.parameters["meshserve.in_flight"].int64_param >= 0
        index = [o.name for o in response.outputs].index("probabilities")
        got = np.frombuffer(response.raw_output_contents[index], dtype=np.float32).reshape(x.shape[0], 10)
        np.testing.assert_allclose(got, session.run(["probabilities"], {"input": x})[0], rtol=1e-4, atol=1e-6)
    # Requests that ran in one dynamic batch finish together and come back in one message.
    assert len(hop.messages) < len(sent)
    assert max(len(entries) for entries in hop.messages) > 1


async def test_hop_answers_a_malformed_entry_under_its_id(demo_repository: Path, processes: ProcessGroup) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    x = np.ones((1, 64), np.float32)
    # A well-formed head, then an `inputs` field (5) whose length runs past the end.
    broken = service_pb2.ModelInferRequest(model_name="digits", id="broken").SerializeToString() + b"\x2a\x05\x0a"
    async with grpc.aio.insecure_channel(address) as channel:
        hop = Hop(channel)
        hop.send(broken, request("digits", x, "fine"))
        replies = await hop.receive(2)
        hop.close()
    assert status_of(replies["broken"]) == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies["broken"].error_message.startswith("malformed ModelInferRequest")
    assert status_of(replies["fine"]) == OK


async def test_hop_drops_passed_deadlines_and_drains(demo_repository: Path, processes: ProcessGroup) -> None:
    proc, address = processes.worker(
        demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "400", "--drain-delay", "0"
    )
    x = np.ones((1, 64), np.float32)
    async with grpc.aio.insecure_channel(address) as channel:
        hop = Hop(channel)
        # 400 ms of injected latency: a 50 ms budget is spent before the model runs.
        hop.send(request("digits", x, "late", deadline_ms=50), request("digits", x, "in-time", deadline_ms=30_000))
        hop.send(*(request("digits", x, f"in-flight-{i}") for i in range(4)))
        await until_in_flight(channel, 6)
        drained = await mesh_pb2_grpc.MeshAdminStub(channel).DrainWorker(mesh_pb2.DrainWorkerRequest(), timeout=5)
        assert drained.in_flight == 6
        hop.send(request("digits", x, "after-drain"))
        replies = await hop.receive(7)
        # The draining worker ends the stream once its requests are answered.
        assert await asyncio.wait_for(hop.call.read(), 10) is grpc.aio.EOF
        assert await hop.call.code() == grpc.StatusCode.OK
    assert status_of(replies["late"]) == DEADLINE_EXCEEDED
    assert status_of(replies["in-time"]) == OK
    for i in range(4):
        assert status_of(replies[f"in-flight-{i}"]) == OK
    refusal = replies["after-drain"]
    assert status_of(refusal) == UNAVAILABLE
    assert refusal.error_message.startswith("worker is draining")
    assert refusal.infer_response.parameters["meshserve.draining"].bool_param
    assert proc.popen.wait(timeout=20) == 0
