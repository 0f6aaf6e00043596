"""Tracing and process-metrics set-up for one process.

Components only use the OpenTelemetry API (`trace.get_tracer(...)`) and their
own `metrics.py` classes; this module, called once by each command, decides
whether spans go anywhere and serves a component's metrics registry.

Tracing follows the standard `OTEL_*` variables (read by the SDK and `meshserve.otlp`):
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) switches export on,
`OTEL_SERVICE_NAME` overrides the per-component default, `OTEL_TRACES_SAMPLER`
and `OTEL_TRACES_SAMPLER_ARG` pick the sampler (default: parent-based
always-on), `OTEL_BSP_*` tune the batching, `OTEL_EXPORTER_OTLP_*` (headers,
timeout, compression, certificate, insecure) the export, and
`OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` switch it off.

Why spans are recorded by `meshserve.tracer.LeanTracerProvider` and exported
by `meshserve.otlp.OtlpSpanProcessor` rather than the SDK's `TracerProvider`
with `BatchSpanProcessor(OTLPSpanExporter())`: at 100% sampling, about five
spans per request, the stock path cost 33.8% of the mesh's throughput on a
2-core box (bench/RESULTS.md). An SDK span costs ~18 us to create and end, the
stock exporter ~32 us more per span to encode, and its batch thread encodes
512 spans at once while holding the GIL, stalling the event loop for ~16 ms.
The lean tracer records a span in ~3 us; the processor writes each span's
OTLP bytes as it ends (~4 us, hand-written protobuf, tested equal to the SDK
encoder's output) and only concatenates and sends them from its thread. The
resource, the `OTEL_*` settings and the wire format stay the SDK's. The
console exporter (`OTEL_TRACES_EXPORTER=console`, for debugging) uses the
SDK's provider and batch processor unchanged.

Why the components write their own server spans instead of installing
opentelemetry-instrumentation-grpc's aio server interceptor:
- the gateway -> worker hop multiplexes many requests over one long-lived
  `ModelStreamInfer` stream, with each request's `traceparent` in its
  `parameters`; the interceptor would make one span per stream (minutes long)
  and could not see the per-request context, and the worker also serves unary
  `ModelInfer`, so mixing both would give two server spans for one RPC;
- the interceptor runs and wraps every servicer context in a proxy object for
  every call even when tracing is off, on a path where per-call CPU is the
  bottleneck (DESIGN.md, performance notes), and it would also trace the
  health checks Consul sends every few seconds.
So there is exactly one server span per RPC, written where the request is
understood (`gateway ModelInfer`, `worker ModelInfer`), with the RPC semantic
convention attributes from `rpc_server_attributes` below.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from socketserver import BaseServer

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "meshserve-"
# How long exit may wait for the last spans; a dead collector must not hold a
# stopping process past its orchestrator's grace period.
SHUTDOWN_TIMEOUT_S = 3.0


def service_name(component: str) -> str:
    """`gateway` -> `meshserve-gateway` (the default `service.name` of a component)."""
    return component if component.startswith(SERVICE_PREFIX) else SERVICE_PREFIX + component


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the standard variables ask for span export."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter in ("none", ""):
        return False
    if exporter == "console":
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def install_propagator() -> None:
    """W3C trace context only: what the gateway reads from clients and forwards to workers."""
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))


# A version-00 `traceparent` exactly as W3C Trace Context writes it (lowercase hex, no extra fields).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_EMPTY_TRACE_STATE = TraceState()


def extract_traceparent(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    """The parent context a W3C `traceparent` names, as the installed propagator would extract it;
    None when there is none, or it is malformed.

    Every traced request reads one (a client's, or the gateway's on the hop to a worker). The
    common form, version 00 without `tracestate`, is parsed here for about half the propagator's
    cost (~1.7 us of ~3.5 us on the bench host); anything else (a `tracestate`, a later version,
    a malformed value) goes through `propagate.extract`, so the rules stay the propagator's."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent) if tracestate is None else None
    if match is None:
        carrier = {"traceparent": traceparent}
        if tracestate is not None:
            carrier["tracestate"] = tracestate
        context = propagate.extract(carrier)
        return context if trace.get_current_span(context).get_span_context().is_valid else None
    trace_id = int(match[1], 16)
    span_id = int(match[2], 16)
    if not trace_id or not span_id:
        return None
    span_context = SpanContext(trace_id, span_id, True, TraceFlags(int(match[3], 16)), _EMPTY_TRACE_STATE)
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def format_traceparent(span_context: SpanContext) -> str:
    """The W3C `traceparent` that names `span_context` as the parent, as the propagator's inject writes it."""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


def configure_tracing(component: str, environ: Mapping[str, str] | None = None) -> bool:
    """Installs an SDK tracer provider when export is requested; returns whether it did.

    Without export the API's no-op provider stays in place: spans cost a
    context switch and nothing is recorded, yet a client's `traceparent` still
    flows through (non-recording spans carry the parent's ids). Export runs in
    the processor's own thread, so a slow or dead collector never blocks a
    request; its queue drops spans when full rather than grow.
    """
    install_propagator()
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name(component)}
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; the
    # sampler follows OTEL_TRACES_SAMPLER(_ARG) (inside the SDK's TracerProvider for console).
    resource = Resource.create(attributes)
    provider: trace.TracerProvider
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        # Debugging output: the SDK's own provider and console exporter; cost does not matter there.
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from meshserve.otlp import OtlpSpanProcessor
        from meshserve.tracer import LeanTracerProvider, sampler_from_environ

        provider = LeanTracerProvider(
            resource, sampler_from_environ(env), OtlpSpanProcessor(resource=resource, environ=env)
        )
    trace.set_tracer_provider(provider)
    atexit.register(shutdown)
    logger.info("tracing on: exporting spans as %s", resource.attributes.get(SERVICE_NAME))
    return True


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Flushes buffered spans and stops the exporter, waiting at most `timeout_s`.

    Safe to call more than once and when tracing is off. The flush runs in a
    daemon thread so that a collector that does not answer cannot hold the
    process past the timeout.
    """
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is None:
        return
    flusher = threading.Thread(target=stop, name="otel-shutdown", daemon=True)
    flusher.start()
    flusher.join(timeout_s)
    if flusher.is_alive():
        logger.warning("trace exporter did not flush within %.1fs; the last spans may be lost", timeout_s)


def tracing_enabled() -> bool:
    """True when a recording tracer provider is installed (the API's proxy/no-op records nothing).

    Components read it once at start-up (after `configure_tracing`) to skip
    building spans nobody records: even a no-op span costs a few microseconds.
    """
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def rpc_server_attributes(service: str, method: str, address: str | None = None) -> dict[str, str]:
    """The RPC semantic-convention attributes of a gRPC server span."""
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if address:
        attributes["server.address"] = address
    return attributes


def process_registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and GC collectors, for one component's metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsPortInUse(RuntimeError):
    """The `--metrics-port` is taken by another process."""


@dataclass
class MetricsServer:
    """The running `/metrics` HTTP endpoint of one process."""

    port: int
    _server: BaseServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serves `registry` at http://host:port/metrics in a daemon thread; port 0 picks a free one.

    Raises MetricsPortInUse with a message saying what to do when the port is taken.
    """
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise MetricsPortInUse(
                f"metrics port {port} on {host} is already in use; choose another with --metrics-port "
                f"(or MESHSERVE_METRICS_PORT), or 0 for a free port"
            ) from error
        raise
    bound = server.server_address[1]
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(port=bound, _server=server, _thread=thread)
