"""`LoadGenerator` against an in-process KServe v2 gRPC server: what goes on the wire, what is counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from meshserve.loadgen import BenchSettings, LoadGenerator, report_dict
from protos import grpc_service_pb2, grpc_service_pb2_grpc


class RecordingServer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Serves one model; refuses every fourth inference with RESOURCE_EXHAUSTED, as a full worker queue would."""

    def __init__(self) -> None:
        self.requests: list[grpc_service_pb2.ModelInferRequest] = []
        self.authorization: set[str] = set()

    async def ModelMetadata(
        self, request: grpc_service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> grpc_service_pb2.ModelMetadataResponse:
        if request.name != "toy":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        reply = grpc_service_pb2.ModelMetadataResponse(name="toy", versions=["1"], platform="onnxruntime_onnx")
        reply.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
        reply.outputs.add(name="y", datatype="FP32", shape=[-1, 4])
        return reply

    async def ModelInfer(
        self, request: grpc_service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> grpc_service_pb2.ModelInferResponse:
        self.requests.append(request)
        self.authorization.add(dict(context.invocation_metadata()).get("authorization", ""))
        if len(self.requests) % 4 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        reply = grpc_service_pb2.ModelInferResponse(model_name="toy", model_version="1")
        reply.outputs.add(name="y", datatype="FP32", shape=list(request.inputs[0].shape))
        reply.raw_output_contents.append(request.raw_input_contents[0])
        return reply


@pytest.fixture
async def toy_server() -> AsyncIterator[tuple[RecordingServer, str]]:
    servicer = RecordingServer()
    server = grpc.aio.server()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def test_load_generator_sends_valid_requests_with_the_key_and_counts_codes(
    toy_server: tuple[RecordingServer, str],
) -> None:
    servicer, url = toy_server
    settings = BenchSettings(url=url, api_key="k3y", concurrency=[1, 4], duration=0.3, warmup=0.05, batch_size=2)
    results = await LoadGenerator(settings).run("toy")

    assert [r.concurrency for r in results] == [1, 4]
    for result in results:
        assert result.requests > 0
        assert result.errors.get("RESOURCE_EXHAUSTED", 0) > 0
        assert set(result.errors) == {"RESOURCE_EXHAUSTED"}
    assert servicer.authorization == {"Bearer k3y"}
    first = servicer.requests[0]
    assert first.model_name == "toy"
    assert list(first.inputs[0].shape) == [2, 4]
    assert first.inputs[0].datatype == "FP32"
    assert len(first.raw_input_contents[0]) == 2 * 4 * 4

    document = report_dict("toy", settings, results)
    assert document["model"] == "toy" and document["url"] == url
    assert [level["concurrency"] for level in document["levels"]] == [1, 4]


async def test_unknown_model_fails_before_any_load(toy_server: tuple[RecordingServer, str]) -> None:
    servicer, url = toy_server
    settings = BenchSettings(url=url, concurrency=[1], duration=0.2, warmup=0.0)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await LoadGenerator(settings).run("missing")
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert servicer.requests == []
