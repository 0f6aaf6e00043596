"""deploy/healthcheck.py, the image's HEALTHCHECK, against a real gRPC health service."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.harness import REPO_ROOT, free_port

SCRIPT = REPO_ROOT / "deploy" / "healthcheck.py"


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def probe(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHSERVE_PORT": str(port)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_serving_process_is_healthy(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    done = probe(port)

    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


def test_draining_process_is_unhealthy(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    done = probe(port)

    assert done.returncode == 1
    assert "NOT_SERVING" in done.stdout


def test_nothing_listening_is_unhealthy() -> None:
    done = probe(free_port())

    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr
