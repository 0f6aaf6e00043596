"""The per-process metrics registry and its /metrics HTTP server."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from meshserve import telemetry


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        family.name: [(sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_registry_has_process_metrics_and_is_per_instance() -> None:
    first, second = telemetry.process_registry(), telemetry.process_registry()
    Counter("meshserve_requests", "requests", ["component"], registry=first).labels("worker").inc()

    assert first.get_sample_value("process_cpu_seconds_total") is not None
    assert first.get_sample_value("python_info", {"implementation": "CPython"}) is not None or any(
        metric.name == "python_info" for metric in first.collect()
    )
    assert first.get_sample_value("meshserve_requests_total", {"component": "worker"}) == 1
    assert second.get_sample_value("meshserve_requests_total", {"component": "worker"}) is None


def test_metrics_server_on_port_zero_serves_the_registry_and_reports_its_port() -> None:
    registry = telemetry.process_registry()
    requests = Counter("meshserve_requests", "requests", ["component", "model", "code"], registry=registry)
    server = telemetry.start_metrics_server(registry, 0, host="127.0.0.1")
    try:
        assert server.port > 0
        requests.labels("gateway", "mlp784", "OK").inc(3)

        families = scrape(server.port)

        assert ({"component": "gateway", "model": "mlp784", "code": "OK"}, 3.0) in families["meshserve_requests"]
        assert "process_cpu_seconds" in families
    finally:
        server.close()


def test_a_taken_metrics_port_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]

        with pytest.raises(telemetry.MetricsPortInUse, match=rf"metrics port {taken} .*--metrics-port"):
            telemetry.start_metrics_server(telemetry.process_registry(), taken, host="127.0.0.1")
