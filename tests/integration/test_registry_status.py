"""`meshserve status`: a table of workers from the registry; exit 0 with a passing worker, 1 without, 2 when
the registry cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, ProcessGroup, free_port

pytestmark = pytest.mark.integration


def status(url: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve", "status", "--registry", url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": str(columns), "PATH": "/usr/bin:/bin"},
    )


def put(url: str, path: str, body: object | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url.replace("consul://", "http://") + path, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_status_lists_workers_and_exits_by_health(processes: ProcessGroup) -> None:
    _, url = processes.registry()
    empty = status(url)
    assert empty.returncode == 1, empty.stdout + empty.stderr
    assert "no worker is passing" in empty.stdout

    registration = {
        "Name": "meshserve-worker",
        "ID": "host-9100-abc",
        "Address": "10.0.0.7",
        "Port": 9100,
        "Tags": ["meshserve", "model=mlp:1", "model=mlp:2"],
        "Meta": {"device": "cpu", "grpc_port": "9100"},
        "Check": {"TTL": "30s"},
    }
    put(url, "/v1/agent/service/register", registration)
    critical = status(url)
    assert critical.returncode == 1
    assert "critical" in critical.stdout and "10.0.0.7:9100" in critical.stdout

    put(url, "/v1/agent/check/pass/service:host-9100-abc")
    passing = status(url)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    for text in ("10.0.0.7:9100", "host-9100-abc", "mlp:1, mlp:2", "passing", "cpu", "1 of 1 passing"):
        assert text in passing.stdout

    put(url, "/v1/agent/service/maintenance/host-9100-abc?enable=true&reason=draining")
    drained = status(url)
    assert drained.returncode == 1 and "maintenance" in drained.stdout


def test_status_reports_an_unreachable_registry() -> None:
    result = status(f"consul://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "unreachable" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_status_shows_a_real_workers_models_and_load(processes: ProcessGroup, demo_repository: Path) -> None:
    _, url = processes.registry()
    _, address = processes.worker(demo_repository, registry_url=url)
    port = address.rsplit(":", 1)[1]
    deadline = time.monotonic() + 10
    result = status(url)
    while result.returncode != 0 and time.monotonic() < deadline:  # until the agent's first gRPC check passed
        time.sleep(0.2)
        result = status(url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f":{port}" in result.stdout
    assert "queue 0" in result.stdout  # read from the worker's /metrics, advertised in Meta
    assert "mlp784:1" in result.stdout
    # Whole on 80 columns, what a pipe gets: an operator copies addresses and ids from here.
    with urllib.request.urlopen(url.replace("consul://", "http://") + "/v1/agent/services", timeout=5) as response:
        (worker_id,) = json.loads(response.read())
    narrow = status(url, columns=80)
    assert f" {address} " in narrow.stdout and f" {worker_id} " in narrow.stdout, narrow.stdout
