"""meshserve.otlp: the hand-written OTLP encoder against the SDK's own, and
OtlpSpanProcessor against a real in-process OTLP/gRPC receiver, a dead
collector and one that never answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from meshserve import otlp
from tests.harness import free_port
from tests.otlp_receiver import OtlpReceiver, _TraceService, otel_env

REMOTE = SpanContext(
    trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
    span_id=0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "opaque"), ("other", "x-1")]),
)
LOCAL_LINK = SpanContext(
    trace_id=0x1, span_id=0xFFFFFFFFFFFFFFFF, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
)

EVERY_TYPE: dict[str, Any] = {
    "str": "grpc",
    "empty": "",
    "unicode": "modèle-数字",
    "long": "x" * 20000,  # a three-byte length varint
    "true": True,
    "false": False,
    "zero": 0,
    "int": 42,
    "negative": -7,
    "int64.max": 2**63 - 1,
    "int64.min": -(2**63),
    "float": 1.5,
    "float.zero": 0.0,
    "float.negative": -2.25e-300,
    "bytes": b"\x00\xff",
    "strs": ["a", "", "c"],
    "bools": [True, False],
    "ints": [1, -1, 300],
    "floats": [0.5, 0.0],
    "empty.array": [],
    "with.none": ["a", None],
    "map": {"a": 1, "nested": {"z": [1, 2]}},
}


def _spans() -> tuple[TracerProvider, list[ReadableSpan]]:
    """Varied real SDK spans: every kind, root/local/remote parents, all attribute types, events, links, status."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "meshserve-test", "host.cores": 2, "deployment.canary": False, "weights": [0.5, 1.0]},
            schema_url="https://opentelemetry.io/schemas/1.21.0",
        ),
        span_limits=SpanLimits(max_span_attributes=40, max_events=3, max_links=2, max_event_attributes=1),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("meshserve.a", "1.2.3", schema_url="https://example.com/schema")
    bare = provider.get_tracer("meshserve.b")
    scoped = provider.get_tracer("meshserve.c", "0.1", attributes={"scope.attr": "yes", "n": 3})

    with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes=EVERY_TYPE) as root:
        root.add_event("received", {"bytes": 12, "peer": "10.0.0.1"})  # one attribute dropped by the limit
        root.add_event("no attributes")
        root.add_event("", timestamp=123)
        root.add_event("dropped by max_events")
        for kind in SpanKind:
            with bare.start_as_current_span(f"child {kind.name}", kind=kind) as child:
                child.set_status(Status(StatusCode.OK))
        with scoped.start_as_current_span(
            "linked",
            links=[
                Link(REMOTE, {"link.kind": "follows", "link.n": [1, 2]}),
                Link(LOCAL_LINK),
                Link(REMOTE, {"dropped": "by max_links"}),
            ],
        ) as linked:
            linked.set_status(Status(StatusCode.ERROR, "model failed: shape mismatch"))
            linked.set_attributes({f"k{i}": i for i in range(42)})  # past max_span_attributes
        with tracer.start_as_current_span("") as unnamed:
            unnamed.set_status(Status(StatusCode.ERROR))
    remote_parent = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    for kind in (SpanKind.SERVER, SpanKind.CONSUMER):
        with tracer.start_as_current_span("continued", context=remote_parent, kind=kind) as span:
            span.record_exception(ValueError("boom"))
    return provider, list(exporter.get_finished_spans())


def _expected(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    """The SDK encoder's request, plus the link trace_state that it leaves out and we send."""
    expected = encode_spans(spans)
    by_id = {span.context.span_id: span for span in spans}
    for scope_spans in expected.resource_spans[0].scope_spans:
        for pb_span in scope_spans.spans:
            sdk_span = by_id[int.from_bytes(pb_span.span_id, "big")]
            for pb_link, link in zip(pb_span.links, sdk_span.links, strict=True):
                pb_link.trace_state = ",".join(f"{k}={v}" for k, v in link.context.trace_state.items())
    return expected


def test_the_encoder_matches_the_sdk_encoder_field_for_field() -> None:
    provider, spans = _spans()
    assert len(spans) == 10

    encoded = otlp.encode_export_request(
        provider.resource, [(s.instrumentation_scope, otlp.encode_span(s)) for s in spans]
    )

    ours = ExportTraceServiceRequest.FromString(encoded)
    expected = _expected(spans)
    assert ours == expected
    # The fixture does exercise what it claims to.
    pb_spans = [span for scope in ours.resource_spans[0].scope_spans for span in scope.spans]
    assert {span.kind for span in pb_spans} == {1, 2, 3, 4, 5}
    assert {span.flags for span in pb_spans} == {0x100, 0x300}
    assert any(span.trace_state == "vendor=opaque,other=x-1" for span in pb_spans)
    assert any(link.trace_state for span in pb_spans for link in span.links)
    assert any(span.dropped_attributes_count for span in pb_spans)
    assert any(span.dropped_events_count for span in pb_spans)
    assert any(span.dropped_links_count for span in pb_spans)
    assert any(event.dropped_attributes_count for span in pb_spans for event in span.events)
    assert {span.status.code for span in pb_spans} == {0, 1, 2}
    assert len(ours.resource_spans[0].scope_spans) == 3


def test_a_single_span_is_the_sdk_span_message() -> None:
    _, spans = _spans()
    expected = {span.span_id: span for scope in _expected(spans).resource_spans[0].scope_spans for span in scope.spans}

    for span in spans:
        ours = trace_pb2.Span.FromString(otlp.encode_span(span))
        assert ours == expected[ours.span_id], span.name


def test_equal_scopes_held_in_different_objects_are_grouped_like_the_sdk() -> None:
    resource = Resource.create({"service.name": "s"})
    spans = [
        ReadableSpan(
            name=name,
            context=SpanContext(trace_id=1, span_id=i + 1, is_remote=False),
            resource=resource,
            instrumentation_scope=InstrumentationScope(f"scope.{name}", "1"),
            start_time=i,
            end_time=i + 1,
        )
        for i, name in enumerate(("a", "b", "a", "b", "a"))
    ]
    # Five scope objects, two distinct scopes.
    assert len({id(span.instrumentation_scope) for span in spans}) == 5

    encoded = otlp.encode_export_request(resource, [(s.instrumentation_scope, otlp.encode_span(s)) for s in spans])

    ours = ExportTraceServiceRequest.FromString(encoded)
    assert ours == encode_spans(spans)
    assert [len(scope.spans) for scope in ours.resource_spans[0].scope_spans] == [3, 2]


def test_values_the_sdk_encoder_cannot_encode_are_left_out_the_same_way() -> None:
    # ReadableSpan takes attributes as given; the SDK's set_attribute would have refused these.
    span = ReadableSpan(
        name="raw",
        context=LOCAL_LINK,
        resource=Resource.create({}),
        attributes={"fine": "yes", "huge": 2**64, "object": object(), "nested.bad": [1, object()]},
        instrumentation_scope=InstrumentationScope("raw"),
        start_time=1,
        end_time=2,
    )

    encoded = otlp.encode_export_request(span.resource, [(span.instrumentation_scope, otlp.encode_span(span))])

    ours = ExportTraceServiceRequest.FromString(encoded)
    assert ours == encode_spans([span])
    assert [kv.key for kv in ours.resource_spans[0].scope_spans[0].spans[0].attributes] == ["fine"]


# --------------------------------------------------------------------------
# Configuration from the environment
# --------------------------------------------------------------------------


def test_defaults_follow_the_specification() -> None:
    config = otlp.OtlpConfig.from_environ({})

    assert config.target == "localhost:4317" and config.insecure
    assert config.headers == () and config.timeout_s == 10.0
    assert config.compression == grpc.Compression.NoCompression
    assert (config.schedule_delay_s, config.max_queue_size, config.max_export_batch_size) == (5.0, 2048, 512)
    assert config.export_timeout_s == 30.0


def test_trace_specific_variables_win_over_the_general_ones() -> None:
    config = otlp.OtlpConfig.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
            "OTEL_EXPORTER_OTLP_HEADERS": "general=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20abc%3D%3D, x-tenant = a%2Cb ,bad",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "4",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1000",
            "OTEL_BSP_EXPORT_TIMEOUT": "1500",
        }
    )

    assert config.target == "traces:4317" and config.insecure
    assert config.headers == (("authorization", "Bearer abc=="), ("x-tenant", "a,b"))
    assert config.timeout_s == 2.5
    assert config.compression == grpc.Compression.Gzip
    assert config.schedule_delay_s == 0.25 and config.export_timeout_s == 1.5
    # A batch cannot be larger than the queue it is taken from.
    assert (config.max_queue_size, config.max_export_batch_size) == (100, 100)


@pytest.mark.parametrize(
    ("environ", "target", "insecure"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "collector:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317"}, "collector:4317", False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
            "collector",
            False,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_INSECURE": "false"},
            "collector:4317",
            False,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "collector:4317", False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "TRUE"},
            "collector:4317",
            True,
        ),
    ],
)
def test_the_scheme_and_insecure_pick_the_channel_security(
    environ: dict[str, str], target: str, insecure: bool
) -> None:
    config = otlp.OtlpConfig.from_environ(environ)

    assert (config.target, config.insecure) == (target, insecure)
    config.channel().close()


def test_a_certificate_is_read_for_tls(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    config = otlp.OtlpConfig.from_environ(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(pem)}
    )
    assert config.root_certificates == b"-----BEGIN CERTIFICATE-----\n"

    missing = otlp.OtlpConfig.from_environ(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "no"),
        }
    )
    assert missing.root_certificates is None  # logged; the system roots are used


def test_invalid_numbers_fall_back_to_the_defaults() -> None:
    config = otlp.OtlpConfig.from_environ(
        {"OTEL_BSP_SCHEDULE_DELAY": "soon", "OTEL_BSP_MAX_QUEUE_SIZE": "-1", "OTEL_EXPORTER_OTLP_TIMEOUT": "0"}
    )

    assert (config.schedule_delay_s, config.max_queue_size, config.timeout_s) == (5.0, 2048, 10.0)


# --------------------------------------------------------------------------
# The processor against a real receiver
# --------------------------------------------------------------------------


class _MetadataRecordingService(_TraceService):
    def __init__(self) -> None:
        super().__init__()
        self.metadata: list[dict[str, str]] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
        return super().Export(request, context)


class RecordingReceiver(OtlpReceiver):
    """tests.otlp_receiver's receiver, also keeping the gRPC metadata of each export."""

    def __init__(self) -> None:
        # Same set-up as OtlpReceiver, with the recording servicer registered instead.
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._service = self.recording = _MetadataRecordingService()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._service, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    running = RecordingReceiver()
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _provider(processor: otlp.OtlpSpanProcessor, service: str = "meshserve-unit", **kwargs: Any) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}), shutdown_on_exit=False, **kwargs)
    provider.add_span_processor(processor)
    return provider


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_spans_reach_the_receiver_on_force_flush_with_the_headers(
    receiver: RecordingReceiver, compression: str
) -> None:
    env = otel_env(
        receiver,
        OTEL_BSP_SCHEDULE_DELAY="600000",
        OTEL_EXPORTER_OTLP_HEADERS="x-api-key=s3cr%20t%3D,X-Tenant=blue,x-bad=caf%C3%A9",
        OTEL_EXPORTER_OTLP_COMPRESSION=compression,
    )
    processor = otlp.OtlpSpanProcessor(environ=env)
    provider = _provider(processor)
    tracer = provider.get_tracer("meshserve.test", "9")
    try:
        with (
            tracer.start_as_current_span("outer", kind=SpanKind.SERVER, attributes={"rpc.system": "grpc"}) as outer,
            tracer.start_as_current_span("inner", links=[Link(REMOTE)]),
        ):
            pass

        assert receiver.spans() == []  # the delay is far away: only the flush sends them
        assert processor.force_flush(10_000)

        spans = {span.name: span for span in receiver.spans()}
        assert set(spans) == {"outer", "inner"}
        assert {span.service for span in spans.values()} == {"meshserve-unit"}
        assert spans["outer"].trace_id == format(outer.get_span_context().trace_id, "032x")
        assert spans["inner"].parent_span_id == spans["outer"].span_id
        assert spans["outer"].kind == 2 and spans["outer"].attributes == {"rpc.system": "grpc"}
        assert spans["inner"].links == [(format(REMOTE.trace_id, "032x"), format(REMOTE.span_id, "016x"))]
        (metadata,) = receiver.recording.metadata
        assert metadata["x-api-key"] == "s3cr t=" and metadata["x-tenant"] == "blue"
        # gRPC refuses a non-ASCII value for the whole call: that header alone is left out (and logged).
        assert "x-bad" not in metadata
        assert processor.exported_spans == 2 and processor.dropped_spans == processor.failed_spans == 0
    finally:
        provider.shutdown()


def test_a_full_batch_or_the_schedule_delay_sends_without_a_flush(receiver: RecordingReceiver) -> None:
    by_size = otlp.OtlpSpanProcessor(
        environ=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4")
    )
    by_time = otlp.OtlpSpanProcessor(environ=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="50"))
    size_tracer = _provider(by_size, "by-size").get_tracer("t")
    time_tracer = _provider(by_time, "by-time").get_tracer("t")
    try:
        for _ in range(4):
            size_tracer.start_span("batched").end()
        time_tracer.start_span("timed").end()

        spans = receiver.wait_for(
            lambda s: len([x for x in s if x.service == "by-size"]) == 4 and any(x.service == "by-time" for x in s),
            timeout=20,
            what="a full batch and a delayed span",
        )
        assert {(span.service, span.name) for span in spans} == {("by-size", "batched"), ("by-time", "timed")}
    finally:
        by_size.shutdown()
        by_time.shutdown()


def test_spans_ended_on_many_threads_all_arrive_once(receiver: RecordingReceiver) -> None:
    processor = otlp.OtlpSpanProcessor(
        environ=otel_env(receiver, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="64", OTEL_BSP_MAX_QUEUE_SIZE="4096")
    )
    tracer = _provider(processor).get_tracer("threads")
    ended: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        ids = []
        for i in range(250):
            span = tracer.start_span("work", attributes={"i": i})
            span.end()
            ids.append(format(span.get_span_context().span_id, "016x"))
        with lock:
            ended.extend(ids)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert processor.force_flush(20_000)
        received = [span.span_id for span in receiver.spans()]
        assert len(received) == len(ended) == 2000
        assert set(received) == set(ended)
        assert processor.exported_spans == 2000 and processor.dropped_spans == 0
    finally:
        processor.shutdown()


def test_ended_spans_are_encoded_in_batches_where_they_end(
    receiver: RecordingReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded_on: list[str] = []
    real_encode = otlp.encode_span

    def recording_encode(span: ReadableSpan) -> bytes:
        encoded_on.append(threading.current_thread().name)
        return real_encode(span)

    monkeypatch.setattr(otlp, "encode_span", recording_encode)
    processor = otlp.OtlpSpanProcessor(environ=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    tracer = _provider(processor).get_tracer("batches")
    try:
        for _ in range(otlp._ENCODE_BATCH - 1):
            tracer.start_span("held").end()
        assert encoded_on == [] and processor.buffered == otlp._ENCODE_BATCH - 1

        tracer.start_span("completes the batch").end()
        # The span that completed the batch encoded all of them, on the thread that ended it.
        assert encoded_on == [threading.current_thread().name] * otlp._ENCODE_BATCH

        tracer.start_span("straggler").end()
        assert processor.force_flush(10_000)  # fewer than a batch: the sender encodes it when due
        assert len(receiver.spans()) == otlp._ENCODE_BATCH + 1
        assert encoded_on[-1] == "otlp-span-sender"
    finally:
        processor.shutdown()


def test_a_span_that_cannot_be_encoded_costs_only_itself(
    receiver: RecordingReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_encode = otlp.encode_span

    def failing_encode(span: ReadableSpan) -> bytes:
        if span.name == "bad":
            raise ValueError("not encodable")
        return real_encode(span)

    monkeypatch.setattr(otlp, "encode_span", failing_encode)
    processor = otlp.OtlpSpanProcessor(environ=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    tracer = _provider(processor).get_tracer("bad")
    try:
        names = ["bad" if i == 5 else f"good-{i}" for i in range(otlp._ENCODE_BATCH + 3)]
        for name in names:
            tracer.start_span(name).end()
        assert processor.force_flush(10_000)  # the flush counts the failed span as done
        assert sorted(span.name for span in receiver.spans()) == sorted(n for n in names if n != "bad")
        assert processor.failed_spans == 1 and processor.exported_spans == len(names) - 1
    finally:
        processor.shutdown()


def test_unsampled_spans_are_not_encoded_or_sent(receiver: RecordingReceiver) -> None:
    processor = otlp.OtlpSpanProcessor(environ=otel_env(receiver))
    tracer = _provider(processor, sampler=ALWAYS_OFF).get_tracer("off")
    try:
        tracer.start_span("dropped").end()
        assert processor.buffered == 0
        assert processor.force_flush(1000)
        assert receiver.spans() == [] and receiver.recording.metadata == []
    finally:
        processor.shutdown()


def test_shutdown_flushes_and_is_safe_twice(receiver: RecordingReceiver) -> None:
    processor = otlp.OtlpSpanProcessor(environ=otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    provider = _provider(processor)
    provider.get_tracer("t").start_span("last").end()

    provider.shutdown()
    processor.shutdown()

    assert [span.name for span in receiver.spans()] == ["last"]
    provider.get_tracer("t").start_span("after shutdown").end()
    assert processor.buffered == 0 and not processor.force_flush(100)


# --------------------------------------------------------------------------
# Collectors that are gone or stuck
# --------------------------------------------------------------------------


def _shutdown_within(processor: otlp.OtlpSpanProcessor, timeout_millis: int, join_s: float) -> bool:
    """Runs shutdown in a thread; whether it returned within `join_s`."""
    stopper = threading.Thread(target=processor.shutdown, kwargs={"timeout_millis": timeout_millis}, daemon=True)
    stopper.start()
    stopper.join(join_s)
    return not stopper.is_alive()


def test_a_dead_collector_costs_dropped_spans_never_a_blocked_caller() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
        "OTEL_BSP_EXPORT_TIMEOUT": "2000",
    }
    processor = otlp.OtlpSpanProcessor(environ=env)
    tracer = _provider(processor).get_tracer("dead")
    most_buffered = 0
    for i in range(2000):
        tracer.start_span("lost", attributes={"i": i}).end()
        if i % 50 == 0:
            most_buffered = max(most_buffered, processor.buffered)

    assert most_buffered <= 64
    # Each batch is tried for over a second (UNAVAILABLE retries), so the queue overflowed.
    assert processor.dropped_spans > 0
    assert _shutdown_within(processor, timeout_millis=2000, join_s=30)
    assert processor.exported_spans == 0
    assert processor.dropped_spans + processor.failed_spans == 2000
    assert _shutdown_within(processor, timeout_millis=2000, join_s=5)  # second call: returns at once


@pytest.fixture
def silent_collector() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word: a hung collector."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_hung_collector_does_not_hold_shutdown_past_its_timeout(silent_collector: str) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": silent_collector,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "60",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "32",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",
    }
    processor = otlp.OtlpSpanProcessor(environ=env)
    tracer = _provider(processor).get_tracer("hung")
    for _ in range(200):  # the sender is stuck on the first batch for its 60 s RPC timeout
        tracer.start_span("stuck").end()
    assert processor.buffered <= 32 and processor.dropped_spans > 0
    assert not processor.force_flush(200)

    assert _shutdown_within(processor, timeout_millis=300, join_s=30)
    assert processor.exported_spans == 0
    assert processor.dropped_spans + processor.failed_spans == 200


def test_attribute_sets_that_compare_equal_but_differ_in_type_are_encoded_apart() -> None:
    """The whole-set cache keys on the values' types too: 1, 1.0 and True are equal in Python, not in OTLP."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("meshserve.cache")
    otlp._span_attributes_cache.clear()
    for value in (1, 1.0, True, 1, True):
        tracer.start_span("s", attributes={"rpc.system": "grpc", "n": value}).end()
    spans = list(exporter.get_finished_spans())
    expected = {span.span_id: span for scope in _expected(spans).resource_spans[0].scope_spans for span in scope.spans}
    kinds = []
    for span in spans:
        ours = trace_pb2.Span.FromString(otlp.encode_span(span))
        assert ours == expected[ours.span_id]
        kinds.append(ours.attributes[1].value.WhichOneof("value"))
    assert kinds == ["int_value", "double_value", "bool_value", "int_value", "bool_value"]
    assert len(otlp._span_attributes_cache) == 3  # the sets went through the cache, one entry per type
