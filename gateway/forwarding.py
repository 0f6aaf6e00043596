"""`ModelInfer` through the gateway: bytes in, bytes out.

authenticate -> rate-limit -> resolve the version -> balancer picks a worker
-> the request's own bytes, plus an appended hop id and per-request context
(remaining deadline, trace context), go over a multiplexed stream -> the
worker's response bytes come back with the client's id restored.
No tensor is decoded or re-encoded here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
from opentelemetry import trace

from gateway import wire
from gateway.auth import Authenticator, AuthError
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.routes import RouteError, RouteTable
from gateway.upstream import Upstream
from loadbalancer.balancer import Balancer
from loadbalancer.endpoint import Endpoint
from loadbalancer.errors import AttemptFailed, NoEndpointAvailable
from meshserve.busywait import LightLoadPoll
from meshserve.drain import DRAINING_METADATA, DrainGate
from meshserve.telemetry import extract_traceparent, format_traceparent, rpc_server_attributes, tracing_enabled

log = logging.getLogger(__name__)
SERVER_SPAN_ATTRIBUTES = rpc_server_attributes("inference.GRPCInferenceService", "ModelInfer")

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_DEADLINE_KEY = wire.parameter_key("meshserve.deadline_ms")
TRACE_ID_METADATA = "meshserve-trace-id"
RETRY_AFTER_METADATA = "retry-after-ms"
DRAINING_MESSAGE = "gateway is shutting down; retry the request on another gateway"


class RequestRefused(Exception):
    """An answer decided in the gateway, before or after the balancer."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = tuple(trailing)


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def failure_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client gets for what the balancer raised."""
    if isinstance(exc, NoEndpointAvailable):
        return grpc.StatusCode.UNAVAILABLE, f"no healthy worker could serve the request: {exc}"
    if isinstance(exc, AttemptFailed):
        return exc.code, exc.details
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before a worker answered"
    return grpc.StatusCode.INTERNAL, "internal gateway error"


async def attempt_on(
    endpoint: Endpoint, request: bytes, suffix: bytes, timeout_s: float | None, traceparent: str | None
) -> bytes:
    """One try on one worker: the response bytes, or AttemptFailed with the worker's status.

    `suffix` holds fields to append to the request (the routed version); the
    request's own bytes are copied once, when the hop's fields are appended.
    """
    extra = suffix
    if timeout_s is not None:
        extra += wire.encode_int64_parameter(_DEADLINE_KEY, max(1, int(timeout_s * 1000)))
    if traceparent:
        extra += wire.encode_parameter("traceparent", traceparent)
    upstream: Upstream = endpoint.connection  # type: ignore[assignment]
    head = await upstream.infer(request, extra, timeout_s)
    parameters = head.parameters
    queue_depth = parameters.get("meshserve.queue_depth")
    if queue_depth is not None:
        endpoint.report_load(int(queue_depth), int(parameters.get("meshserve.in_flight") or 0))
    if head.error_message:
        status = parameters.get("meshserve.status_code")
        code = STATUS_BY_NUMBER.get(status, grpc.StatusCode.INTERNAL) if isinstance(status, int) else None
        raise AttemptFailed(
            code or grpc.StatusCode.INTERNAL,
            head.error_message,
            draining=bool(parameters.get("meshserve.draining")),
        )
    return head.response


class InferenceForwarder:
    """The generic `ModelInfer` handler (registered with no (de)serializers)."""

    def __init__(
        self,
        balancer: Balancer,
        routes: RouteTable,
        auth: Authenticator,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
        gate: DrainGate,
        *,
        default_timeout_s: float,
        poll: LightLoadPoll | None = None,
    ) -> None:
        self.balancer = balancer
        self.routes = routes
        self.auth = auth
        self.limiter = limiter
        self.metrics = metrics
        self.gate = gate
        self.default_timeout_s = default_timeout_s
        self._tracer = trace.get_tracer("meshserve.gateway")
        self._tracing = tracing_enabled()
        self._poll = poll

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        model = "_unknown"
        code = "OK"
        poll = self._poll
        if poll is not None:
            poll.started()
        gate = self.gate
        gate.enter()
        try:
            metadata = context.invocation_metadata()
            head = self.admit(request, metadata)
            model = head.model_name
            timeout = context.time_remaining()
            if timeout is None:
                timeout = self.default_timeout_s
            if self._tracing:
                response = await self._traced(request, head, metadata, timeout, context)
            else:
                response = await self.forward(request, head, metadata, timeout, metadata_value(metadata, "traceparent"))
            return response + wire.encode_id(head.id)
        except RequestRefused as refused:
            code = refused.code.name
            await context.abort(refused.code, refused.message, trailing_metadata=refused.trailing)
            raise  # unreachable: abort raises
        except (AttemptFailed, NoEndpointAvailable, grpc.aio.AioRpcError, TimeoutError) as exc:
            status, message = failure_status(exc)
            code = status.name
            await context.abort(status, message)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            if context.done():  # abort() already answered
                raise
            code = "INTERNAL"
            log.exception("unexpected error forwarding a request", extra={"model": model})
            await context.abort(grpc.StatusCode.INTERNAL, "internal gateway error")
            raise
        finally:
            gate.leave()
            elapsed = time.perf_counter() - started
            if poll is not None:
                poll.finished(elapsed)
            self.metrics.observe(model, code, elapsed)

    def admit(self, request: bytes, metadata: Sequence[tuple[str, str | bytes]] | None) -> wire.RequestHead:
        """Draining, authentication, request head, authorization, rate limit: everything decided before routing."""
        if self.gate.draining:
            self.gate.refuse()
            raise RequestRefused(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, (DRAINING_METADATA,))
        try:
            tenant = self.auth.authenticate(metadata)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.code.name).inc()
            raise RequestRefused(exc.code, exc.message) from None
        try:
            head = wire.scan_request(request)
        except wire.WireError as exc:
            raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ModelInferRequest: {exc}") from None
        if not head.model_name:
            raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        try:
            self.auth.authorize(tenant, head.model_name)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.code.name).inc()
            raise RequestRefused(exc.code, exc.message) from None
        wait = self.limiter.check(tenant)
        if wait:
            self.metrics.rate_limited.labels(tenant.name).inc()
            retry_ms = max(1, int(wait * 1000 + 0.999))
            raise RequestRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tenant {tenant.name!r} is over its rate limit of {tenant.rate_limit:g} requests/s; "
                f"retry in {retry_ms} ms",
                ((RETRY_AFTER_METADATA, str(retry_ms)),),
            )
        return head

    async def forward(
        self,
        request: bytes,
        head: wire.RequestHead,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        timeout_s: float,
        traceparent: str | None,
    ) -> bytes:
        model = head.model_name
        try:
            version = self.routes.resolve(model, head.model_version)
        except RouteError as exc:
            raise RequestRefused(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        # The worker must serve the version the route chose, not its own default.
        suffix = b"" if head.model_version else wire.encode_model_version(version)
        route = self.routes.route(model)
        hash_key = metadata_value(metadata, route.hash_header) if route is not None and route.hash_header else None
        tracing = self._tracing

        async def attempt(endpoint: Endpoint, remaining: float | None) -> bytes:
            parent = traceparent
            if tracing:
                # The balancer's attempt span is current here: the worker's span nests under it.
                parent = format_traceparent(trace.get_current_span().get_span_context())
            return await attempt_on(endpoint, request, suffix, remaining, parent)

        return await self.balancer.call(model, version, attempt, timeout=timeout_s, hash_key=hash_key)

    async def _traced(
        self,
        request: bytes,
        head: wire.RequestHead,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        timeout_s: float,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        parent = extract_traceparent(metadata_value(metadata, "traceparent"), metadata_value(metadata, "tracestate"))
        attributes = {**SERVER_SPAN_ATTRIBUTES, "meshserve.model": head.model_name}
        with self._tracer.start_as_current_span(
            "gateway ModelInfer", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        ) as span:
            span_context = span.get_span_context()
            if span.is_recording():
                context.set_trailing_metadata(((TRACE_ID_METADATA, format(span_context.trace_id, "032x")),))
            try:
                return await self.forward(request, head, metadata, timeout_s, None)
            except RequestRefused as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
                span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
                raise
            except (AttemptFailed, NoEndpointAvailable, grpc.aio.AioRpcError, TimeoutError) as exc:
                status, message = failure_status(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, message))
                span.set_attribute("rpc.grpc.status_code", status.value[0])
                raise
