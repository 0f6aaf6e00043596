"""The inference path of one worker, independent of gRPC plumbing: look up, validate, queue, answer.

The servicer turns its answers and `InferenceError`s into RPC responses and
status codes; the drain logic begins and settles `gate` (`meshserve.drain`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve.drain import DrainGate
from meshserve.telemetry import extract_traceparent, rpc_server_attributes
from protos import grpc_service_pb2 as pb
from worker.batcher import Job
from worker.codec import decode_inputs, encode_response, requested_outputs
from worker.errors import InferenceError
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.worker")

SERVICE = "inference.GRPCInferenceService"
SERVER_SPAN_ATTRIBUTES = rpc_server_attributes(SERVICE, "ModelInfer")
DRAINING_MESSAGE = "worker is draining; retry the request on another worker"
UNKNOWN_MODEL_LABEL = "<unknown>"  # keeps a client's typos out of metric label values


class InferenceEngine:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: WorkerMetrics,
        inject_latency_ms: float = 0.0,
        tracing: bool = False,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.inject_latency = inject_latency_ms / 1000
        self.tracing = tracing
        self.gate = DrainGate()

    @property
    def draining(self) -> bool:
        return self.gate.draining

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    def queue_depth(self, model_name: str) -> int:
        """Requests waiting in the batchers of this model's versions."""
        return self.repository.queue_depth(model_name)

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None = None,
        trace_context: otel_context.Context | None = None,
    ) -> pb.ModelInferResponse:
        """Serves one request; raises InferenceError with the code for the client."""
        gate = self.gate
        gate.enter()
        started = time.perf_counter()
        label = UNKNOWN_MODEL_LABEL
        code = grpc.StatusCode.OK
        span = None
        model_metrics = None
        try:
            if gate.draining:
                gate.refuse()
                raise InferenceError(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            served = self.repository.get(request.model_name, request.model_version)
            model = served.model
            label = model.name
            model_metrics = served.batcher.metrics
            if self.tracing:
                span = tracer.start_span(
                    "worker ModelInfer",
                    context=trace_context,
                    kind=SpanKind.SERVER,
                    attributes={**SERVER_SPAN_ATTRIBUTES, "meshserve.model": f"{model.name}:{model.version}"},
                )
            arrays, rows = decode_inputs(model, request)
            indices = requested_outputs(model, request)
            loop = asyncio.get_running_loop()
            if self.inject_latency:
                await asyncio.sleep(self.inject_latency)
            if deadline is not None and loop.time() > deadline:
                raise InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request ran")
            job = Job(
                arrays,
                rows,
                indices,
                loop.create_future(),
                deadline,
                # Queue wait and batch links only for a request whose spans are recorded.
                span.get_span_context() if span is not None and span.is_recording() else None,
            )
            result = await served.batcher.submit(job)
            return encode_response(model, request.id, indices, result)
        except InferenceError as exc:
            code = exc.code
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, exc.message))
                span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("request for model %r failed", request.model_name)
            raise InferenceError(
                grpc.StatusCode.INTERNAL, f"internal error serving model '{request.model_name}'; see the worker log"
            ) from exc
        finally:
            gate.leave()
            self.metrics.count_request(label, code)
            if model_metrics is not None:
                model_metrics.duration.observe(time.perf_counter() - started)
            if span is not None:
                span.end()

    async def infer_streamed(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        """One request from a ModelStreamInfer stream; failures become an error response, never an exception.

        Per-request context rides in the request's parameters: `meshserve.deadline_ms`
        (remaining milliseconds) and the W3C `traceparent` / `tracestate`.
        """
        params = request.parameters
        deadline = None
        if "meshserve.deadline_ms" in params:
            deadline = asyncio.get_running_loop().time() + params["meshserve.deadline_ms"].int64_param / 1000
        trace_context = None
        if self.tracing and "traceparent" in params:
            tracestate = params["tracestate"].string_param if "tracestate" in params else None
            trace_context = extract_traceparent(params["traceparent"].string_param, tracestate)
        try:
            response = await self.infer(request, deadline, trace_context)
            reply = pb.ModelStreamInferResponse(infer_response=response)
        except InferenceError as exc:
            reply = pb.ModelStreamInferResponse(error_message=exc.message)
            failed = reply.infer_response
            failed.id = request.id
            failed.model_name = request.model_name
            failed.model_version = request.model_version
            failed.parameters["meshserve.status_code"].int64_param = exc.code.value[0]
            if self.draining:
                failed.parameters["meshserve.draining"].bool_param = True
        report = reply.infer_response.parameters
        report["meshserve.queue_depth"].int64_param = self.queue_depth(request.model_name)
        report["meshserve.in_flight"].int64_param = self.in_flight
        return reply
