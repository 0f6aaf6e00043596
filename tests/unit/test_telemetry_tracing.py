"""meshserve.telemetry tracing set-up, exercised in child interpreters (the
OpenTelemetry tracer provider can be set once per process) exporting to an
in-test OTLP/gRPC receiver."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import context, propagate, trace

from meshserve import telemetry
from tests.harness import REPO_ROOT, free_port
from tests.otlp_receiver import OtlpReceiver, otel_env, otlp_receiver

SPAN_SCRIPT = """
import sys
from opentelemetry import propagate, trace
from meshserve import telemetry

on = telemetry.configure_tracing(sys.argv[1])
tracer = trace.get_tracer("meshserve.test")
parent = propagate.extract({"traceparent": sys.argv[2]}) if len(sys.argv) > 2 else None
with tracer.start_as_current_span("test root", context=parent) as span:
    with tracer.start_as_current_span("test child"):
        pass
print("on" if on else "off", format(span.get_span_context().trace_id, "032x"), flush=True)
telemetry.shutdown()
"""

REMOTE_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED_PARENT = f"00-{REMOTE_TRACE_ID}-00f067aa0ba902b7-01"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    return {**env, **extra}


def run_script(env: dict[str, str], *args: str) -> tuple[str, str]:
    """Runs SPAN_SCRIPT in a child interpreter; returns ("on"/"off", trace id)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SPAN_SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    state, trace_id = done.stdout.split()
    return state, trace_id


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


def test_spans_reach_the_collector_under_the_component_service_name(receiver: OtlpReceiver) -> None:
    # A batch delay far beyond the child's life: only shutdown()'s flush can deliver the spans.
    state, trace_id = run_script(_clean_env(**otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000")), "worker")

    assert state == "on"
    spans = receiver.wait_for(lambda s: len([x for x in s if x.trace_id == trace_id]) == 2, what="two spans")
    by_name = {span.name: span for span in spans if span.trace_id == trace_id}
    assert {span.service for span in by_name.values()} == {"meshserve-worker"}
    assert by_name["test child"].parent_span_id == by_name["test root"].span_id
    assert by_name["test root"].parent_span_id == ""


def test_otel_service_name_overrides_the_default(receiver: OtlpReceiver) -> None:
    _, trace_id = run_script(_clean_env(**otel_env(receiver), OTEL_SERVICE_NAME="edge-gw"), "gateway")

    spans = receiver.wait_for(lambda s: any(x.trace_id == trace_id for x in s), what="the span")
    assert {span.service for span in spans if span.trace_id == trace_id} == {"edge-gw"}


def test_ratio_sampler_drops_new_traces_but_follows_a_sampled_parent(receiver: OtlpReceiver) -> None:
    env = _clean_env(**otel_env(receiver, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0"))
    _, unsampled_trace = run_script(env, "gateway")
    _, continued_trace = run_script(env, "gateway", SAMPLED_PARENT)

    assert continued_trace == REMOTE_TRACE_ID
    spans = receiver.wait_for(lambda s: any(x.trace_id == REMOTE_TRACE_ID for x in s), what="the continued trace")
    root = next(span for span in spans if span.trace_id == REMOTE_TRACE_ID and span.name == "test root")
    assert root.parent_span_id == "00f067aa0ba902b7"
    # Shutdown flushed both children before they exited, so nothing of the dropped trace is still coming.
    assert not receiver.trace(unsampled_trace)


def test_without_an_endpoint_nothing_is_installed_and_the_client_trace_still_flows(receiver: OtlpReceiver) -> None:
    state, trace_id = run_script(_clean_env(), "gateway", SAMPLED_PARENT)

    assert state == "off"
    # The no-op provider's spans carry the caller's trace id, so it still reaches workers and logs.
    assert trace_id == REMOTE_TRACE_ID


def test_a_dead_collector_does_not_break_the_process() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = _clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=dead, OTEL_BSP_SCHEDULE_DELAY="50")

    state, trace_id = run_script(env, "worker")

    assert state == "on"
    assert len(trace_id) == 32 and int(trace_id, 16) != 0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ],
)
def test_tracing_requested_follows_the_standard_variables(environ: dict[str, str], expected: bool) -> None:
    assert telemetry.tracing_requested(environ) is expected


def test_service_names_get_the_meshserve_prefix_once() -> None:
    assert telemetry.service_name("gateway") == "meshserve-gateway"
    assert telemetry.service_name("meshserve-worker") == "meshserve-worker"


def test_the_propagator_is_w3c_trace_context() -> None:
    telemetry.install_propagator()
    extracted = propagate.extract({"traceparent": SAMPLED_PARENT})
    parent = trace.get_current_span(extracted).get_span_context()
    assert format(parent.trace_id, "032x") == REMOTE_TRACE_ID

    carrier: dict[str, str] = {}
    token = context.attach(extracted)
    try:
        propagate.inject(carrier)
    finally:
        context.detach(token)
    assert carrier["traceparent"] == SAMPLED_PARENT
    assert propagate.get_global_textmap().fields == {"traceparent", "tracestate"}


def test_rpc_server_attributes_follow_the_semantic_conventions() -> None:
    assert telemetry.rpc_server_attributes("inference.GRPCInferenceService", "ModelInfer", "10.0.0.5") == {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "server.address": "10.0.0.5",
    }


def test_shutdown_without_tracing_is_a_no_op() -> None:
    telemetry.shutdown(timeout_s=0.1)


@pytest.mark.parametrize(
    "value",
    [
        SAMPLED_PARENT,
        SAMPLED_PARENT[:-2] + "00",  # not sampled
        SAMPLED_PARENT.upper(),  # W3C hex is lowercase
        "ff" + SAMPLED_PARENT[2:],  # version ff is invalid
        "01" + SAMPLED_PARENT[2:] + "-future",  # a later version may add fields
        "00" + SAMPLED_PARENT[2:] + "-extra",  # version 00 may not
        f"00-{'0' * 32}-b7ad6b7169203331-01",  # zero trace id
        f"00-{REMOTE_TRACE_ID}-{'0' * 16}-01",  # zero span id
        f"00-{REMOTE_TRACE_ID}-b7ad6b7169203331-0_",
        f"00-{REMOTE_TRACE_ID[:31]}_-b7ad6b7169203331-01",  # int(..., 16) would take the underscore
        " " + SAMPLED_PARENT,
        "",
        "garbage",
    ],
)
@pytest.mark.parametrize("tracestate", [None, "vendor=opaque,other=x-1"])
def test_the_traceparent_fast_path_extracts_what_the_propagator_does(value: str, tracestate: str | None) -> None:
    telemetry.install_propagator()
    carrier = {"traceparent": value} | ({"tracestate": tracestate} if tracestate else {})
    expected = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    extracted = telemetry.extract_traceparent(value, tracestate)
    if not expected.is_valid:
        assert extracted is None
        return
    assert extracted is not None
    assert trace.get_current_span(extracted).get_span_context() == expected


@pytest.mark.parametrize("flags", [trace.TraceFlags.SAMPLED, trace.TraceFlags.DEFAULT])
def test_format_traceparent_writes_what_the_propagator_injects(flags: int) -> None:
    telemetry.install_propagator()
    span_context = trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False, trace.TraceFlags(flags)
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    assert telemetry.format_traceparent(span_context) == carrier["traceparent"]
