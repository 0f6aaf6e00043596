"""Traces, metrics and logs across real processes: registry, two workers and a
gateway export spans over OTLP/gRPC to an in-test receiver."""

from __future__ import annotations

import json
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import grpc_service_pb2, grpc_service_pb2_grpc
from tests.harness import ManagedProcess, ProcessGroup, free_port, port_open, wait_until
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, otel_env, otlp_receiver

pytestmark = pytest.mark.integration

API_KEY = "observability-test-key"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
RNG = np.random.default_rng(11)
INPUTS = {"mlp784": (1, 784), "cnn": (1, 1, 64, 64)}


@dataclass
class Mesh:
    group: ProcessGroup
    receiver: OtlpReceiver
    gateway: ManagedProcess
    gateway_address: str
    gateway_metrics_port: int
    workers: list[ManagedProcess]
    worker_addresses: list[str]
    registry_http: str
    channel: grpc.Channel

    def stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)


def infer_request(model: str) -> grpc_service_pb2.ModelInferRequest:
    shape = INPUTS[model]
    request = grpc_service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(shape))
    request.raw_input_contents.append(RNG.random(shape, dtype=np.float32).tobytes())
    return request


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, the client's span id) for a sampled client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def call(mesh: Mesh, model: str, traceparent: str | None = None) -> tuple[grpc_service_pb2.ModelInferResponse, dict]:
    metadata = [("authorization", f"Bearer {API_KEY}")]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    response, rpc = mesh.stub().ModelInfer.with_call(infer_request(model), metadata=metadata, timeout=20)
    return response, dict(rpc.trailing_metadata() or ())


def scrape(target: str) -> dict[str, list]:
    """The parsed /metrics of `host:port`, by family name."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def counter(families: dict[str, list], family: str, sample: str, **labels: str) -> float:
    """Sum of `sample` values in `family` whose labels include `labels`."""
    return sum(
        s.value
        for s in families.get(family, [])
        if s.name == sample and all(s.labels.get(key) == value for key, value in labels.items())
    )


@pytest.fixture(scope="module")
def mesh(demo_repository: Path) -> Iterator[Mesh]:
    with otlp_receiver() as receiver, ProcessGroup() as group:
        env = otel_env(receiver)
        _, registry_url = group.registry()
        workers, worker_addresses = [], []
        # One worker with a chosen metrics port, one with the default (0: a free port, advertised in Consul Meta).
        for index, metrics_flag in enumerate([["--metrics-port", str(free_port())], []]):
            port = free_port()
            worker = group.start(
                f"worker-{index}",
                "worker",
                "--model-repository",
                str(demo_repository),
                "--registry",
                registry_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *metrics_flag,
                env={**env, "CUDA_VISIBLE_DEVICES": ""},
            )
            worker.wait_serving(f"127.0.0.1:{port}")
            workers.append(worker)
            worker_addresses.append(f"127.0.0.1:{port}")
        metrics_port = free_port()
        gateway, address = group.gateway(
            registry_url, "--metrics-port", str(metrics_port), "--api-key", API_KEY, env=env
        )
        with grpc.insecure_channel(address) as channel:
            registry_http = registry_url.replace("consul://", "http://")
            built = Mesh(
                group, receiver, gateway, address, metrics_port, workers, worker_addresses, registry_http, channel
            )
            # Both workers known to the gateway before the tests start.
            wait_until(lambda: _endpoints_known(built) >= 2, 30, interval=0.2, what="the gateway to see both workers")
            yield built


def _endpoints_known(mesh: Mesh) -> float:
    families = scrape(f"127.0.0.1:{mesh.gateway_metrics_port}")
    return max(
        (s.value for s in families.get("meshserve_endpoints", []) if s.labels.get("model") == "mlp784"),
        default=0,
    )


def spans_of(mesh: Mesh, trace_id: str, needed: set[str]) -> dict[str, list[ReceivedSpan]]:
    """The spans of one trace, by name, once every name in `needed` arrived."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        return needed <= {span.name for span in spans if span.trace_id == trace_id}

    mesh.receiver.wait_for(complete, what=f"{sorted(needed)} in trace {trace_id}")
    by_name: dict[str, list[ReceivedSpan]] = {}
    for span in mesh.receiver.trace(trace_id):
        by_name.setdefault(span.name, []).append(span)
    return by_name


def test_a_client_traceparent_yields_one_trace_through_gateway_and_worker(mesh: Mesh) -> None:
    traceparent, trace_id, client_span = new_traceparent()

    _, trailing = call(mesh, "mlp784", traceparent)

    assert trailing["meshserve-trace-id"] == trace_id
    needed = {"gateway ModelInfer", "balancer.attempt", "worker ModelInfer", "worker.queue_wait"}
    spans = spans_of(mesh, trace_id, needed)
    (gateway,) = spans["gateway ModelInfer"]
    (attempt,) = spans["balancer.attempt"]
    (worker,) = spans["worker ModelInfer"]
    assert gateway.service == "meshserve-gateway" and worker.service == "meshserve-worker"
    assert gateway.parent_span_id == client_span
    assert attempt.parent_span_id == gateway.span_id
    assert worker.parent_span_id == attempt.span_id
    assert {span.parent_span_id for span in spans["worker.queue_wait"]} == {worker.span_id}
    # Exactly one server span per RPC in each process, with the RPC semantic conventions.
    servers = [span for group in spans.values() for span in group if span.kind == SERVER_KIND]
    assert sorted(span.name for span in servers) == ["gateway ModelInfer", "worker ModelInfer"]
    for span in servers:
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert span.attributes["rpc.method"] == "ModelInfer"
    assert attempt.attributes["meshserve.attempt"] == 1
    assert attempt.attributes["meshserve.outcome"] == "ok"
    assert attempt.attributes["meshserve.policy"]
    assert attempt.attributes["meshserve.endpoint"].startswith("127.0.0.1:")
    # The batch that ran the request is its own span, linked to the request; ONNX Runtime's run is its child.
    request = (trace_id, worker.span_id)
    received = mesh.receiver.wait_for(
        lambda all_spans: any(s.name == "worker.batch" and request in s.links for s in all_spans), what="the batch"
    )
    batch = next(span for span in received if span.name == "worker.batch" and request in span.links)
    mesh.receiver.wait_for(
        lambda all_spans: any(s.name == "ort.run" and s.parent_span_id == batch.span_id for s in all_spans),
        what="the ort.run span of the batch",
    )


def test_a_direct_unary_call_to_a_worker_has_one_server_span_under_the_client(mesh: Mesh) -> None:
    traceparent, trace_id, client_span = new_traceparent()

    with grpc.insecure_channel(mesh.worker_addresses[0]) as channel:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request("mlp784"), metadata=[("traceparent", traceparent)], timeout=20
        )

    spans = spans_of(mesh, trace_id, {"worker ModelInfer", "worker.queue_wait"})
    servers = [span for group in spans.values() for span in group if span.kind == SERVER_KIND]
    assert [(span.name, span.parent_span_id) for span in servers] == [("worker ModelInfer", client_span)]


def test_a_batch_span_links_the_requests_it_merged(mesh: Mesh) -> None:
    # cnn takes milliseconds per sample and waits 500 us for a batch to fill,
    # so concurrent requests queue up behind a run and merge into the next one.
    calls = [new_traceparent() for _ in range(12)]
    threads = [threading.Thread(target=call, args=(mesh, "cnn", traceparent)) for traceparent, _, _ in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    worker_spans: dict[tuple[str, str], ReceivedSpan] = {}
    for _, trace_id, _ in calls:
        (span,) = spans_of(mesh, trace_id, {"worker ModelInfer"})["worker ModelInfer"]
        worker_spans[(span.trace_id, span.span_id)] = span

    def batches_cover_all(spans: list[ReceivedSpan]) -> bool:
        linked = {link for span in spans if span.name == "worker.batch" for link in span.links}
        return worker_spans.keys() <= linked

    received = mesh.receiver.wait_for(batches_cover_all, what="batch spans linking every request")
    batches = [span for span in received if span.name == "worker.batch" and set(span.links) & worker_spans.keys()]
    for batch in batches:
        assert batch.attributes["meshserve.batch_size"] >= len(batch.links)
    merged = [batch for batch in batches if len(set(batch.links) & worker_spans.keys()) >= 2]
    assert merged, f"no batch merged two requests: sizes {[b.attributes['meshserve.batch_size'] for b in batches]}"
    # Each request ran in exactly one batch.
    assert sum(len(set(batch.links) & worker_spans.keys()) for batch in batches) == len(worker_spans)


def test_an_unsampled_request_leaves_no_span_and_no_link(mesh: Mesh) -> None:
    """A client that did not sample (flags 00) gets nothing recorded anywhere, not even a batch span
    (a root span of its own) linking to it."""
    unsampled_id, sampled_parent = secrets.token_hex(16), new_traceparent()
    with grpc.insecure_channel(mesh.worker_addresses[0]) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(
            infer_request("cnn"), metadata=[("traceparent", f"00-{unsampled_id}-{'1' * 16}-00")], timeout=20
        )
        # Then a sampled one through the same worker: its spans leave after the first request's would have.
        stub.ModelInfer(infer_request("cnn"), metadata=[("traceparent", sampled_parent[0])], timeout=20)
    (server,) = spans_of(mesh, sampled_parent[1], {"worker ModelInfer"})["worker ModelInfer"]
    received = mesh.receiver.wait_for(
        lambda spans: any(s.name == "worker.batch" and (server.trace_id, server.span_id) in s.links for s in spans),
        what="the sampled request's batch span",
    )
    assert not [span.name for span in received if span.trace_id == unsampled_id]
    assert not [span.name for span in received for link in span.links if link[0] == unsampled_id]


def prometheus_worker_targets(mesh: Mesh) -> list[str]:
    """What deploy/prometheus/prometheus.yml's consul_sd relabelling makes of the catalog:
    `<service address>:<Meta.metrics_port>` for each passing meshserve-worker."""
    url = f"{mesh.registry_http}/v1/health/service/meshserve-worker?passing"
    with urllib.request.urlopen(url, timeout=5) as reply:
        entries = json.load(reply)
    return [f"{entry['Service']['Address']}:{entry['Service']['Meta']['metrics_port']}" for entry in entries]


def test_metrics_of_gateway_and_workers_parse_and_count_traffic(mesh: Mesh) -> None:
    targets = prometheus_worker_targets(mesh)
    assert len(targets) == 2 and all(int(target.rsplit(":", 1)[1]) > 0 for target in targets), targets

    def worker_requests() -> float:
        return sum(
            counter(scrape(target), "meshserve_requests", "meshserve_requests_total", model="mlp784", code="OK")
            for target in targets
        )

    gateway_before = scrape(f"127.0.0.1:{mesh.gateway_metrics_port}")
    workers_before = worker_requests()

    for _ in range(5):
        call(mesh, "mlp784")

    gateway_after = scrape(f"127.0.0.1:{mesh.gateway_metrics_port}")
    ok = {"component": "gateway", "model": "mlp784", "code": "OK"}
    assert counter(gateway_after, "meshserve_requests", "meshserve_requests_total", **ok) - counter(
        gateway_before, "meshserve_requests", "meshserve_requests_total", **ok
    ) == pytest.approx(5)
    durations = ("meshserve_request_duration_seconds", "meshserve_request_duration_seconds_count")
    assert counter(gateway_after, *durations, model="mlp784") - counter(
        gateway_before, *durations, model="mlp784"
    ) == pytest.approx(5)
    assert worker_requests() - workers_before == pytest.approx(5)
    assert counter(gateway_after, "meshserve_endpoints", "meshserve_endpoints", model="mlp784") >= 2
    for target in targets:
        families = scrape(target)
        assert counter(families, "process_cpu_seconds", "process_cpu_seconds_total") > 0
        assert "meshserve_batch_size" in families and "meshserve_queue_depth" in families
    assert counter(gateway_after, "process_cpu_seconds", "process_cpu_seconds_total") > 0


def test_logs_are_json_lines_with_the_component(mesh: Mesh) -> None:
    for process, component in [(mesh.gateway, "gateway"), (mesh.workers[0], "worker")]:
        # Every line, ONNX Runtime's native logger included (the worker keeps it off stderr).
        lines = [line for line in process.output().splitlines() if line.strip()]
        assert lines, f"{component} logged nothing"
        entries = [json.loads(line) for line in lines]
        assert {entry["component"] for entry in entries} == {component}
        assert all({"ts", "level", "message", "logger"} <= entry.keys() for entry in entries)


def test_a_retried_request_shows_two_sibling_attempt_spans(mesh: Mesh) -> None:
    """Kills a worker under load: requests in flight to it fail over, none is lost."""
    victim = mesh.workers[1]
    traces: list[str] = []
    failures: list[grpc.RpcError] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            traceparent, trace_id, _ = new_traceparent()
            traces.append(trace_id)
            try:
                call(mesh, "cnn", traceparent)
            except grpc.RpcError as error:
                failures.append(error)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(traces) >= 24, 30, what="load on both workers")
        victim.kill9()
        seen = len(traces)
        wait_until(lambda: len(traces) >= seen + 24, 30, what="load after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert not failures, [f"{e.code()}: {e.details()}" for e in failures]

    def retried(spans: list[ReceivedSpan]) -> list[str]:
        attempts: dict[str, int] = {}
        for span in spans:
            if span.name == "balancer.attempt":
                attempts[span.trace_id] = attempts.get(span.trace_id, 0) + 1
        return [trace_id for trace_id in traces if attempts.get(trace_id, 0) >= 2]

    mesh.receiver.wait_for(lambda spans: bool(retried(spans)), what="a trace with two attempts")
    trace_id = retried(mesh.receiver.spans())[0]
    spans = spans_of(mesh, trace_id, {"gateway ModelInfer", "balancer.attempt"})
    (gateway,) = spans["gateway ModelInfer"]
    attempts = sorted(spans["balancer.attempt"], key=lambda span: span.attributes["meshserve.attempt"])
    assert [span.parent_span_id for span in attempts] == [gateway.span_id] * len(attempts)
    assert [span.attributes["meshserve.attempt"] for span in attempts] == list(range(1, len(attempts) + 1))
    assert attempts[0].attributes["meshserve.outcome"] != "ok"
    assert attempts[-1].attributes["meshserve.outcome"] == "ok"
    assert attempts[0].attributes["meshserve.endpoint"] != attempts[-1].attributes["meshserve.endpoint"]
    # Log lines written inside a span (e.g. the gateway's fail-over warning) name a span the collector has.
    for process in (mesh.gateway, mesh.workers[0]):
        for line in process.output().splitlines():
            if line.startswith("{") and '"trace_id"' in line:
                entry = json.loads(line)
                ids = (entry["trace_id"], entry["span_id"])
                mesh.receiver.wait_for(
                    lambda spans, ids=ids: any((s.trace_id, s.span_id) == ids for s in spans),
                    what=f"the span of log line {entry['message']!r}",
                )


def test_a_dead_collector_does_not_break_serving(processes: ProcessGroup, demo_repository: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": dead, "OTEL_BSP_SCHEDULE_DELAY": "50", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    worker = processes.start(
        "worker-dead-collector",
        "worker",
        "--model-repository",
        str(demo_repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
    )
    worker.wait_serving(f"127.0.0.1:{port}")
    assert not port_open(int(dead.rsplit(":", 1)[1]))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        traceparent, _, _ = new_traceparent()
        for _ in range(20):
            response = stub.ModelInfer(infer_request("mlp784"), metadata=[("traceparent", traceparent)], timeout=10)
            assert response.outputs[0].shape[0] == 1 and response.raw_output_contents

    assert worker.stop(timeout=15) == 0
