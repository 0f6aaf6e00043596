"""Worker spans: the server span continues the caller's trace (gRPC metadata on unary calls,
the request's `traceparent` parameter on streams); queue wait, batch (size, links) and ORT run."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.harness import ProcessGroup, free_port
from tests.otlp_receiver import otel_env, otlp_receiver

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STREAM_TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"


def test_worker_spans_continue_the_callers_trace(demo_repository: Path, processes: ProcessGroup) -> None:
    with otlp_receiver() as receiver:
        port = free_port()
        proc = processes.start(
            "worker",
            "worker",
            "--model-repository",
            str(demo_repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=otel_env(receiver),
        )
        address = f"127.0.0.1:{port}"
        proc.wait_serving(address)
        x = np.ones((2, 64), np.float32)
        with triton.InferenceServerClient(address) as client:
            tensor = triton.InferInput("input", [2, 64], "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("digits", [tensor], headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})

        request = service_pb2.ModelInferRequest(model_name="digits", id="s1")
        request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
        request.raw_input_contents.append(x.tobytes())
        request.parameters["traceparent"].string_param = f"00-{STREAM_TRACE_ID}-{PARENT_ID}-01"
        with grpc.insecure_channel(address) as channel:
            replies = list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request])))
        assert replies[0].infer_response.id == "s1" and not replies[0].error_message

        def complete(trace_id: str):  # type: ignore[no-untyped-def]
            def check(spans: list) -> bool:  # type: ignore[type-arg]
                names = {s.name for s in spans if s.trace_id == trace_id}
                return {"worker ModelInfer", "worker.queue_wait"} <= names

            return check

        receiver.wait_for(complete(TRACE_ID), what="the unary request's worker spans")
        spans = receiver.wait_for(complete(STREAM_TRACE_ID), what="the streamed request's worker spans")

    for trace_id in (TRACE_ID, STREAM_TRACE_ID):
        (server,) = [s for s in spans if s.trace_id == trace_id and s.name == "worker ModelInfer"]
        assert server.parent_span_id == PARENT_ID
        assert server.service == "meshserve-worker"
        assert server.kind == 2  # SERVER
        assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.method"] == "ModelInfer"
        (queue_wait,) = [s for s in spans if s.trace_id == trace_id and s.name == "worker.queue_wait"]
        assert queue_wait.parent_span_id == server.span_id
        (batch,) = [s for s in spans if s.name == "worker.batch" and (trace_id, server.span_id) in s.links]
        assert batch.attributes["meshserve.batch_size"] == 2
        (run,) = [s for s in spans if s.name == "ort.run" and s.parent_span_id == batch.span_id]
        assert run.trace_id == batch.trace_id
