"""The KServe v2 `GRPCInferenceService` and the gateway's batched hop (`meshserve.v1.WorkerHop`) on a
worker: converts RPCs and delegates to the engine."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from meshserve import __version__
from meshserve.drain import DRAINING_METADATA
from meshserve.telemetry import extract_traceparent
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc
from worker.engine import InferenceEngine
from worker.errors import InferenceError

Context = grpc.aio.ServicerContext

PLATFORM = "onnxruntime_onnx"
_END = object()  # the client closed its side of the stream
_DRAIN = object()  # the worker stopped accepting: end the stream once its requests are answered


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer, mesh_pb2_grpc.WorkerHopServicer):
    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self.repository = engine.repository
        self._streams: set[Callable[[], None]] = set()  # each open stream's "finish and end" callback

    def stop_streams(self) -> None:
        """Asks every open ModelStreamInfer / InferStream to finish its outstanding requests and end."""
        for stop in list(self._streams):
            stop()

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
        trace_context = None
        if engine.tracing:
            metadata = dict(context.invocation_metadata() or ())
            trace_context = extract_traceparent(metadata.get("traceparent"), metadata.get("tracestate"))
        try:
            response = await engine.infer(request, deadline, trace_context)
        except InferenceError as exc:
            trailer = self._load_report(request.model_name)
            if engine.draining and exc.code == grpc.StatusCode.UNAVAILABLE:
                trailer += (DRAINING_METADATA,)
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

        stop = functools.partial(replies.put_nowait, _DRAIN)
        self._streams.add(stop)
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
            self._streams.discard(stop)
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def InferStream(
        self, request_iterator: AsyncIterator[mesh_pb2.InferBatch], context: Context
    ) -> AsyncIterator[mesh_pb2.InferBatchResponse]:
        # ModelStreamInfer's semantics, several requests per message each way: every
        # request goes straight to the engine (and its dynamic batcher); the first
        # answer goes out at once, the answers that complete while that write is in
        # flight (a batch finishes many at once) go out together when it completes.
        ready: list[bytes] = []
        wake = asyncio.Event()
        outstanding = 0
        closing = self.engine.draining
        tasks: set[asyncio.Task[None]] = set()
        by_id: dict[str, asyncio.Task[None]] = {}  # by hop id, for the gateway's cancels

        def finish() -> None:
            nonlocal closing
            closing = True
            wake.set()

        async def answer(request: pb.ModelInferRequest) -> None:
            nonlocal outstanding
            try:
                reply = await self.engine.infer_streamed(request)
            except asyncio.CancelledError:
                # The gateway gave up on it: no answer, and nothing left to wait for.
                outstanding -= 1
                wake.set()
                raise
            finally:
                by_id.pop(request.id, None)
            ready.append(reply.SerializeToString())
            wake.set()

        async def read() -> None:
            nonlocal outstanding
            try:
                async for batch in request_iterator:
                    for raw in batch.requests:
                        outstanding += 1
                        try:
                            request = pb.ModelInferRequest.FromString(raw)
                        except DecodeError as exc:
                            ready.append(_malformed(raw, exc))
                            wake.set()
                            continue
                        task = asyncio.create_task(answer(request))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        by_id[request.id] = task
                    for hop_id in batch.cancelled:
                        cancelled = by_id.pop(hop_id, None)
                        if cancelled is not None:
                            cancelled.cancel()
            finally:
                finish()

        self._streams.add(finish)
        reader = asyncio.create_task(read())
        try:
            while True:
                if ready:
                    batch, ready = ready, []
                    outstanding -= len(batch)
                    yield mesh_pb2.InferBatchResponse(responses=batch)
                elif closing and outstanding == 0:
                    return
                else:
                    wake.clear()
                    await wake.wait()
        finally:
            self._streams.discard(finish)
            reader.cancel()
            for task in tasks:
                task.cancel()

    def _load_report(self, model_name: str) -> tuple[tuple[str, str], ...]:
        return (
            ("meshserve-queue-depth", str(self.engine.queue_depth(model_name))),
            ("meshserve-in-flight", str(self.engine.in_flight)),
        )


def _malformed(raw: bytes, exc: DecodeError) -> bytes:
    """The answer to a hop entry that does not parse: INVALID_ARGUMENT, under the request's id if one can be read."""
    reply = pb.ModelStreamInferResponse(error_message=f"malformed ModelInferRequest: {exc}")
    reply.infer_response.id = _last_id(raw)
    reply.infer_response.parameters["meshserve.status_code"].int64_param = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    return reply.SerializeToString()


def _last_id(raw: bytes) -> str:
    """The last top-level `id` (field 3) of a ModelInferRequest whose nested messages may be broken; "" if none."""
    found = ""
    pos = 0
    try:
        while pos < len(raw):
            key, pos = _varint(raw, pos)
            wire_type = key & 7
            if wire_type == 0:
                pos = _varint(raw, pos)[1]
            elif wire_type == 2:
                length, pos = _varint(raw, pos)
                if key >> 3 == 3 and pos + length <= len(raw):
                    found = raw[pos : pos + length].decode(errors="replace")
                pos += length
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            else:
                break
    except IndexError:
        pass
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7
