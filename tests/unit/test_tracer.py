"""meshserve.tracer: the lean tracer acts like the SDK where the mesh relies on it; its spans encode to OTLP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from meshserve.otlp import encode_span
from meshserve.telemetry import install_propagator
from meshserve.tracer import LeanSpan, LeanTracerProvider, Sampling, sampler_from_environ

REMOTE_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


class Collected(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def by_name(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.spans}


@pytest.fixture
def collected() -> Collected:
    return Collected()


@pytest.fixture
def tracer(collected: Collected) -> trace.Tracer:
    provider = LeanTracerProvider(Resource.create({"service.name": "test"}), Sampling(), collected)
    return provider.get_tracer("meshserve.test", "1.0")


@pytest.fixture(autouse=True)
def w3c() -> Iterator[None]:
    install_propagator()
    yield


def remote_parent(sampled: bool) -> otel_context.Context:
    flags = "01" if sampled else "00"
    return propagate.extract({"traceparent": f"00-{REMOTE_TRACE_ID:032x}-00f067aa0ba902b7-{flags}"})


def test_current_span_nesting_and_a_remote_parent(tracer: trace.Tracer, collected: Collected) -> None:
    with tracer.start_as_current_span("root", context=remote_parent(True), kind=SpanKind.SERVER) as root:
        with tracer.start_as_current_span("child") as child:
            assert trace.get_current_span() is child
        assert trace.get_current_span() is root
    spans = collected.by_name()
    assert spans["root"].context.trace_id == REMOTE_TRACE_ID
    assert spans["root"].parent is not None and spans["root"].parent.is_remote
    assert spans["root"].parent.span_id == 0x00F067AA0BA902B7
    assert spans["child"].parent == spans["root"].context
    assert spans["child"].context.trace_id == REMOTE_TRACE_ID
    assert spans["root"].kind is SpanKind.SERVER
    assert spans["child"].start_time >= spans["root"].start_time
    assert spans["root"].end_time >= spans["child"].end_time  # type: ignore[operator]
    assert spans["child"].instrumentation_scope.name == "meshserve.test"


def test_an_unsampled_parent_gives_a_non_recording_span_on_the_same_trace(
    tracer: trace.Tracer, collected: Collected
) -> None:
    span = tracer.start_span("dropped", context=remote_parent(False))
    span.end()
    assert not span.is_recording()
    assert span.get_span_context().trace_id == REMOTE_TRACE_ID
    assert not span.get_span_context().trace_flags.sampled
    assert collected.spans == []


def test_attributes_status_events_links_and_end_once(tracer: trace.Tracer, collected: Collected) -> None:
    linked = SpanContext(REMOTE_TRACE_ID, 0x1234, is_remote=True, trace_flags=TraceFlags(1))
    span = tracer.start_span("work", attributes={"a": 1}, links=[Link(linked, {"why": "merged"})])
    span.set_attribute("b", "two")
    span.set_attributes({"c": 3.5, "d": [1, 2]})
    span.add_event("checkpoint", {"n": 1})
    span.set_status(Status(StatusCode.ERROR, "bad input"))
    span.set_status(StatusCode.UNSET)  # never overrides
    span.update_name("work done")
    span.end()
    span.end()
    span.set_attribute("late", True)  # ignored after end
    assert len(collected.spans) == 1
    done = collected.spans[0]
    assert done.name == "work done"
    assert dict(done.attributes) == {"a": 1, "b": "two", "c": 3.5, "d": [1, 2]}
    assert [e.name for e in done.events] == ["checkpoint"]
    assert done.links[0].context == linked
    assert done.status.status_code is StatusCode.ERROR and done.status.description == "bad input"


def test_ok_status_is_final(tracer: trace.Tracer) -> None:
    span = tracer.start_span("x")
    span.set_status(StatusCode.OK)
    span.set_status(Status(StatusCode.ERROR, "later"))
    assert isinstance(span, LeanSpan) and span.status.status_code is StatusCode.OK


def test_an_exception_through_start_as_current_span_is_recorded(tracer: trace.Tracer, collected: Collected) -> None:
    with pytest.raises(ValueError), tracer.start_as_current_span("failing"):
        raise ValueError("no such tensor")
    span = collected.by_name()["failing"]
    assert span.status.status_code is StatusCode.ERROR
    event = span.events[0]
    assert event.name == "exception"
    assert event.attributes is not None and event.attributes["exception.type"] == "ValueError"


def test_lean_spans_encode_to_otlp(tracer: trace.Tracer, collected: Collected) -> None:
    with tracer.start_as_current_span("root", context=remote_parent(True), attributes={"rpc.system": "grpc"}):
        pass
    span = trace_pb2.Span.FromString(encode_span(collected.spans[0]))
    assert span.name == "root"
    assert span.trace_id == REMOTE_TRACE_ID.to_bytes(16, "big")
    assert span.parent_span_id == (0x00F067AA0BA902B7).to_bytes(8, "big")
    assert span.attributes[0].key == "rpc.system" and span.attributes[0].value.string_value == "grpc"
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({}, "parentbased(always_on)"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "always_off"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "traceidratio(0.25)"),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            "parentbased(traceidratio(0.5))",
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"}, "traceidratio(1)"),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "parentbased(always_on)"),
    ],
)
def test_sampler_from_the_standard_variables(environ: dict[str, str], description: str) -> None:
    assert sampler_from_environ(environ).describe() == description


def test_ratio_sampling_matches_the_sdk_rule_and_a_parent_wins() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    ours, sdk = Sampling("traceidratio", 0.3, parent_based=True), TraceIdRatioBased(0.3)
    for trace_id in range(1, 1 << 64, (1 << 64) // 997):
        expected = sdk.should_sample(None, trace_id, "x").decision.is_sampled()
        assert ours.sampled(None, trace_id) == expected
    sampled_parent = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1))
    unsampled_parent = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(0))
    assert Sampling("always_off").sampled(sampled_parent, 1)
    assert not Sampling("always_on").sampled(unsampled_parent, 1)
