"""A gateway registers itself as `meshserve-gateway` (address, port, metrics port in Meta), passes its
check only while it can route (a passing worker), and leaves the registry first thing on SIGTERM,
while it still serves through its drain delay; then exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.harness import REPO_ROOT, ProcessGroup, free_port, wait_until

pytestmark = pytest.mark.integration


def gateways(registry_url: str, passing: bool) -> list[dict]:
    http = registry_url.replace("consul://", "http://")
    query = "?passing" if passing else ""
    with urllib.request.urlopen(f"{http}/v1/health/service/meshserve-gateway{query}", timeout=5) as reply:
        return json.load(reply)


def test_gateway_registers_passes_with_a_worker_and_leaves_before_it_stops(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    _, registry_url = processes.registry()
    port = free_port()
    gateway = processes.start(
        "gateway", "gateway", "--registry", registry_url, "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "0", "--drain-delay", "1.5",
    )  # fmt: skip
    gateway.wait_for_output("gateway serving on", timeout=60)
    wait_until(lambda: len(gateways(registry_url, passing=False)) == 1, 10, what="the gateway registered")
    # No worker yet: listed, but not passing, so nothing in front sends it traffic it can only refuse.
    (entry,) = gateways(registry_url, passing=False)
    assert entry["Checks"][-1]["Status"] != "passing"
    assert not gateways(registry_url, passing=True)
    service = entry["Service"]
    assert (service["Address"], service["Port"]) == ("127.0.0.1", port)
    assert service["Meta"]["grpc_port"] == str(port) and service["Meta"]["processes"] == "1"
    assert f"metrics on http://0.0.0.0:{service['Meta']['metrics_port']}/metrics" in gateway.output()

    processes.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
    wait_until(lambda: len(gateways(registry_url, passing=True)) == 1, 30, what="the gateway passing its check")
    listed = subprocess.run(
        [sys.executable, "-m", "meshserve", "status", "--registry", registry_url, "--service", "meshserve-gateway"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"127.0.0.1:{port}" in listed.stdout and "1 of 1 passing" in listed.stdout

    gateway.signal(signal.SIGTERM)
    wait_until(lambda: not gateways(registry_url, passing=False), 1.0, what="the gateway out of the registry")
    # Still serving: the drain delay is for whoever routed here before the registry said otherwise.
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 784), np.float32))
    assert client.infer("mlp784", [tensor], client_timeout=5).as_numpy("probabilities").shape == (1, 10)
    client.close()
    assert gateway.popen.wait(timeout=20) == 0
