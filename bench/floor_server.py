"""Servers answering KServe v2 `ModelInfer` that do less than the worker: the floors of `bench.transport_floor`.

    python -m bench.floor_server --mode MODE --model-file model.onnx --port P

The model must have one FP32 input with a batch dimension first (mlp784 does).

Modes, the aio ones each adding one thing to the one before:

- `aio-bytes`: a grpc.aio generic handler answering with fixed response bytes; reads nothing.
- `aio-typed`: + protobuf: parses the request, builds and serializes the response, sets the
  worker's two load-report trailers.
- `aio-ort`: + a numpy view of the input and one ONNX Runtime run per request (batch 1, on
  the event loop's thread, as the worker runs a microsecond model).
- `sync-bytes`: grpc's thread-pool server (`grpc.server`) with fixed response bytes, the
  other Python server API.

On SIGTERM it prints `ORT RUN CPU US <mean>` (thread CPU microseconds per
ONNX Runtime run, `aio-ort` only) and exits, so the driver can compare a run
inside a busy server with the same run in a tight loop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import bare_ort
from protos import grpc_service_pb2 as pb

READY_LINE = "FLOOR SERVER READY"
ORT_LINE = "ORT RUN CPU US"
MODES = ("aio-bytes", "aio-typed", "aio-ort", "sync-bytes")
# The same trailers the worker sets on every answer (its load report to the balancer).
LOAD_REPORT = (("meshserve-queue-depth", "0"), ("meshserve-in-flight", "1"))


class FloorModel:
    """The model's one input and first output, an ONNX Runtime session and a ready-made answer."""

    def __init__(self, model_file: Path) -> None:
        self.session: Any = bare_ort.session(model_file, 1)  # one thread, as the worker runs a microsecond model
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.row_shape = [d if isinstance(d, int) and d > 0 else 1 for d in model_input.shape[1:]]
        self.output_name = self.session.get_outputs()[0].name
        output = self.session.run([self.output_name], {self.input_name: np.zeros([1, *self.row_shape], np.float32)})
        self.answer = self.response("", output[0]).SerializeToString()
        self.ort_cpu_s = 0.0
        self.ort_runs = 0

    def response(self, request_id: str, output: np.ndarray) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name="floor", model_version="1", id=request_id)
        tensor = response.outputs.add(name=self.output_name, datatype="FP32")
        tensor.shape.extend(output.shape)
        response.raw_output_contents.append(output.tobytes())
        return response

    def run(self, raw: bytes) -> np.ndarray:
        array = np.frombuffer(raw, dtype=np.float32).reshape([-1, *self.row_shape])
        started = time.thread_time()
        output = self.session.run([self.output_name], {self.input_name: array})[0]
        self.ort_cpu_s += time.thread_time() - started
        self.ort_runs += 1
        return output

    def ort_report(self) -> str:
        mean_us = self.ort_cpu_s / self.ort_runs * 1e6 if self.ort_runs else 0.0
        return f"{ORT_LINE} {mean_us:.1f} over {self.ort_runs} runs"


def infer_handler(mode: str, model: FloorModel) -> grpc.RpcMethodHandler:
    if mode == "sync-bytes":
        return grpc.unary_unary_rpc_method_handler(lambda request, context: model.answer)
    if mode == "aio-bytes":

        async def fixed(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return model.answer

        return grpc.unary_unary_rpc_method_handler(fixed)
    run_model = mode == "aio-ort"

    async def typed(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        output = model.run(request.raw_input_contents[0]) if run_model else np.zeros((1, 1), np.float32)
        context.set_trailing_metadata(LOAD_REPORT)
        return model.response(request.id, output)

    return grpc.unary_unary_rpc_method_handler(
        typed,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )


class FloorHandler(grpc.GenericRpcHandler):
    """ModelInfer by mode; every other method of the service says ready (the client's readiness probe)."""

    def __init__(self, mode: str, model: FloorModel) -> None:
        self.infer = infer_handler(mode, model)
        ready = pb.ModelReadyResponse(ready=True).SerializeToString()
        answer: Callable[..., Any]
        if mode.startswith("aio"):

            async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return ready
        else:

            def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
                return ready

        self.ready = grpc.unary_unary_rpc_method_handler(answer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self.infer if handler_call_details.method.endswith("/ModelInfer") else self.ready


async def serve_aio(mode: str, model: FloorModel, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((FloorHandler(mode, model),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(READY_LINE, flush=True)
    await stop.wait()
    await server.stop(0)


def serve_sync(mode: str, model: FloorModel, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((FloorHandler(mode, model),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop(0))
    print(READY_LINE, flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    model = FloorModel(args.model_file)
    if args.mode.startswith("aio"):
        asyncio.run(serve_aio(args.mode, model, args.port))
    else:
        serve_sync(args.mode, model, args.port)
    print(model.ort_report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
