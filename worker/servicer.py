"""The KServe v2 `GRPCInferenceService` on a worker: converts RPCs and delegates to the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry import propagate

from meshserve import __version__
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from worker.engine import InferenceEngine
from worker.errors import InferenceError

Context = grpc.aio.ServicerContext

PLATFORM = "onnxruntime_onnx"
_END = object()  # the client closed its side of the stream
_DRAIN = object()  # the worker stopped accepting: end the stream once its requests are answered


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self.repository = engine.repository
        self._streams: set[asyncio.Queue[object]] = set()

    def stop_streams(self) -> None:
        """Asks every open ModelStreamInfer to finish its outstanding requests and end."""
        for queue in self._streams:
            queue.put_nowait(_DRAIN)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.engine.draining and bool(self.repository.served()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="meshserve", version=__version__, extensions=[])

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except InferenceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.engine.draining)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        try:
            model = self.repository.get(request.name, request.version).model
        except InferenceError as exc:
            await context.abort(exc.code, exc.message)
        response = pb.ModelMetadataResponse(
            name=model.name, versions=[str(v) for v in self.repository.versions(model.name)], platform=PLATFORM
        )
        for spec in model.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        engine = self.engine
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        trace_context = propagate.extract(dict(context.invocation_metadata() or ())) if engine.tracing else None
        try:
            response = await engine.infer(request, deadline, trace_context)
        except InferenceError as exc:
            trailer = self._load_report(request.model_name)
            if engine.draining and exc.code == grpc.StatusCode.UNAVAILABLE:
                trailer += (("meshserve-draining", "1"),)
            await context.abort(exc.code, exc.message, trailing_metadata=trailer)
        context.set_trailing_metadata(self._load_report(request.model_name))
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests on one stream run concurrently and may complete out of order;
        # each response carries its request's id.
        replies: asyncio.Queue[object] = asyncio.Queue()
        outstanding = 0
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            replies.put_nowait(await self.engine.infer_streamed(request))

        async def read() -> None:
            nonlocal outstanding
            try:
                async for request in request_iterator:
                    outstanding += 1
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                replies.put_nowait(_END)

        self._streams.add(replies)
        reader = asyncio.create_task(read())
        closing = self.engine.draining
        try:
            while not (closing and outstanding == 0):
                item = await replies.get()
                if item is _END or item is _DRAIN:
                    closing = True
                    continue
                outstanding -= 1
                yield item
        finally:
            self._streams.discard(replies)
            reader.cancel()
            for task in tasks:
                task.cancel()

    def _load_report(self, model_name: str) -> tuple[tuple[str, str], ...]:
        return (
            ("meshserve-queue-depth", str(self.engine.queue_depth(model_name))),
            ("meshserve-in-flight", str(self.engine.in_flight)),
        )
