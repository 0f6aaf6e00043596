"""Tracing set-up for one process (OpenTelemetry SDK).

Components only use the OpenTelemetry API (`trace.get_tracer(...)`); this
module, called once by each command, decides whether spans go anywhere.
"""

from __future__ import annotations

import os

from opentelemetry import trace


def configure_tracing(service_name: str) -> None:
    """Installs an SDK tracer provider exporting OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

    Without an endpoint the API's no-op provider stays in place, so spans cost
    next to nothing.
    """
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
