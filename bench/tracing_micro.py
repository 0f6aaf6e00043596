"""Per-call cost of the request path's tracing pieces, in-process (a micro-benchmark: hot caches, no load).

    python -m bench.tracing_micro [--calls 20000]

Prints microseconds per call for the W3C header read and write against the
propagator's, one span's OTLP encoding, and the gateway's whole tracing path
per request (server span, attempt span, traceparent for the hop), with the
lean tracer and OTLP processor the commands install. Under load every one of
these costs 3-4x more (bench/RESULTS.md, "tracing"); use this to compare two
versions of the code, side by side on the same machine, not as absolute times.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

# Export to a closed port with a schedule far in the future: spans are encoded and queued, never sent.
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "3600000")

from opentelemetry import propagate, trace

from gateway.forwarding import SERVER_SPAN_ATTRIBUTES, metadata_value
from meshserve import otlp, telemetry

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
METADATA = (("authorization", "Bearer key"), ("user-agent", "grpc-python"))
ATTEMPT_ATTRIBUTES = {
    "meshserve.endpoint": "127.0.0.1:50051",
    "meshserve.policy": "p2c",
    "meshserve.attempt": 1,
    "meshserve.hedge": False,
    "meshserve.model": "mlp784",
    "meshserve.model_version": "1",
}


def per_call_us(function: Callable[[], object], calls: int) -> float:
    for _ in range(calls // 10):
        function()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    if not telemetry.configure_tracing("gateway"):
        raise SystemExit("tracing did not switch on")
    processor = trace.get_tracer_provider().processor  # type: ignore[attr-defined]
    gateway_tracer = trace.get_tracer("meshserve.gateway")
    balancer_tracer = trace.get_tracer("meshserve.loadbalancer")
    attempt = balancer_tracer.start_span(
        "balancer.attempt", attributes={**ATTEMPT_ATTRIBUTES, "meshserve.outcome": "ok"}
    )
    attempt.end()
    parent = telemetry.extract_traceparent(TRACEPARENT)
    assert parent is not None
    span_context = trace.get_current_span(parent).get_span_context()

    def inject() -> None:
        with trace.use_span(trace.NonRecordingSpan(span_context)):
            propagate.inject({})

    def format_header() -> None:
        with trace.use_span(trace.NonRecordingSpan(span_context)):
            telemetry.format_traceparent(trace.get_current_span().get_span_context())

    def gateway_request() -> None:
        # What InferenceForwarder._traced and Balancer._attempt_span do for one request.
        context = telemetry.extract_traceparent(
            metadata_value(METADATA, "traceparent"), metadata_value(METADATA, "tracestate")
        )
        attributes = {**SERVER_SPAN_ATTRIBUTES, "meshserve.model": "mlp784"}
        with gateway_tracer.start_as_current_span(
            "gateway ModelInfer", context=context, kind=trace.SpanKind.SERVER, attributes=attributes
        ) as server:
            format(server.get_span_context().trace_id, "032x")
            with balancer_tracer.start_as_current_span(
                "balancer.attempt", attributes=dict(ATTEMPT_ATTRIBUTES), record_exception=False
            ) as span:
                telemetry.format_traceparent(trace.get_current_span().get_span_context())
                span.set_attribute("meshserve.outcome", "ok")
        processor._buffer.clear()  # nothing is sent: keep the queue from filling

    rows = [
        (
            "traceparent read, meshserve.telemetry.extract_traceparent",
            lambda: telemetry.extract_traceparent(TRACEPARENT),
        ),
        ("traceparent read, propagate.extract", lambda: propagate.extract({"traceparent": TRACEPARENT})),
        ("traceparent write, format_traceparent (span made current)", format_header),
        ("traceparent write, propagate.inject (span made current)", inject),
        ("OTLP encoding of a 7-attribute attempt span", lambda: otlp.encode_span(attempt)),
        ("gateway tracing per request (2 spans, 1 traceparent)", gateway_request),
    ]
    for what, function in rows:
        print(f"{per_call_us(function, args.calls):8.2f} us  {what}")


if __name__ == "__main__":
    main()
