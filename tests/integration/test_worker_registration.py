"""A worker given --registry registers itself (tags per model version, Meta), passes its gRPC
health check, and on SIGTERM leaves the registry before it stops serving, then exits 0."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.harness import ProcessGroup, free_port, grpc_serving, wait_until

pytestmark = pytest.mark.integration


def passing_workers(registry_url: str) -> list[dict]:
    http = registry_url.replace("consul://", "http://")
    with urllib.request.urlopen(f"{http}/v1/health/service/meshserve-worker?passing", timeout=5) as reply:
        return json.load(reply)


def test_worker_registers_and_deregisters_before_it_stops(demo_repository: Path, processes: ProcessGroup) -> None:
    _, registry_url = processes.registry()
    proc, address = processes.worker(
        demo_repository, "--host", "127.0.0.1", "--drain-delay", "1.5", registry_url=registry_url
    )
    wait_until(lambda: len(passing_workers(registry_url)) == 1, 30, what="the worker passing its health check")
    service = passing_workers(registry_url)[0]["Service"]
    assert service["Address"] == "127.0.0.1"
    assert service["Port"] == int(address.rsplit(":", 1)[1])
    assert {"meshserve", "model=digits:1", "model=mlp784:1", "model=cnn:1"} <= set(service["Tags"])
    meta = service["Meta"]
    assert meta["grpc_port"] == str(service["Port"])
    assert meta["device"] == "cpu" and meta["max_batch"] == "64" and meta["version"]
    assert f"metrics on http://127.0.0.1:{meta['metrics_port']}/metrics" in proc.output()

    proc.signal(signal.SIGTERM)
    # Out of the registry while it still serves (the drain delay), so balancers move away first.
    wait_until(lambda: passing_workers(registry_url) == [], 10, what="the worker leaving the registry")
    assert proc.alive()
    assert proc.popen.wait(timeout=30) == 0
    assert not grpc_serving(address)


def test_a_worker_started_before_its_registry_serves_and_registers_once_it_answers(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    """Compose waits for Consul's health check; a host reboot or a Consul restart may not: the worker
    must not exit because the registry is not there yet."""
    registry_port = free_port()
    registry_url = f"consul://127.0.0.1:{registry_port}"
    proc, address = processes.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
    proc.wait_for_output("will register as", timeout=10)
    assert grpc_serving(address)
    processes.registry(port=registry_port)
    wait_until(lambda: len(passing_workers(registry_url)) == 1, 30, what="the worker registered and passing")
    assert proc.alive()
