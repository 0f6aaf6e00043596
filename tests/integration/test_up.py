"""`meshserve up` as a user runs it: starts, answers, restarts a dead child, stops cleanly on SIGTERM
leaving no process behind; a port in use is a clear message."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.harness import REPO_ROOT, ManagedProcess, ProcessGroup, free_port, wait_until

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _started_pids(output: str) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for name, pid in re.findall(r"started (\S+) \(pid (\d+)\)", output):
        pids.setdefault(name, []).append(int(pid))
    return pids


def start_up(
    processes: ProcessGroup, demo_repository: Path, tmp_path: Path, workers: int
) -> tuple[ManagedProcess, int]:
    """`meshserve up` on free ports, serving mlp784; returns it, once it says it is up, and its gateway port."""
    repository = tmp_path / "repo"
    shutil.copytree(demo_repository / "mlp784", repository / "mlp784")
    port, registry_port, metrics_port = free_port(), free_port(), free_port()
    up = processes.start(
        "up", "up", "--workers", str(workers), "--port", str(port), "--registry-port", str(registry_port),
        "--metrics-port", str(metrics_port), "--model-repository", str(repository),
    )  # fmt: skip
    up.wait_for_output("meshserve is up", timeout=90)
    return up, port


def test_up_starts_answers_restarts_and_stops_cleanly(
    demo_repository: Path, processes: ProcessGroup, tmp_path: Path
) -> None:
    up, port = start_up(processes, demo_repository, tmp_path, workers=2)
    output = up.output()
    key = re.search(r"API key\s+(\S+)", output).group(1)
    assert f"meshserve infer mlp784 --random --url 127.0.0.1:{port} --api-key {key}" in output
    assert "worker-1 |" in output and "gateway |" in output  # children's logs, prefixed

    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 784), dtype=np.float32))
    result = client.infer("mlp784", [tensor], headers={"authorization": f"Bearer {key}"})
    assert result.as_numpy("probabilities").shape == (1, 10)

    # A child that dies is reported and started again.
    worker_pid = _started_pids(up.output())["worker-1"][0]
    os.kill(worker_pid, signal.SIGKILL)
    up.wait_for_output("worker-1 exited with code -9; restarting", timeout=10)
    wait_until(lambda: len(_started_pids(up.output())["worker-1"]) == 2, 15, what="worker-1 restarted")

    pids = [pid for group in _started_pids(up.output()).values() for pid in group]
    assert up.stop(timeout=60) == 0
    final_output = up.log_path.read_text()
    assert "up | stopped" in final_output
    wait_until(lambda: not any(_pid_alive(pid) for pid in pids), 5, what="children gone")
    stopping = final_output.split("stopping:")[1]
    # Gateway first, then the workers (drained), the registry last.
    assert stopping.index("drained") < stopping.index("registry agent stopping")


def test_a_second_signal_kills_what_still_runs(demo_repository: Path, processes: ProcessGroup, tmp_path: Path) -> None:
    """An impatient second Ctrl-C does not wait out the drains: every child is killed, and the exit code
    says the stop was not clean."""
    up, _ = start_up(processes, demo_repository, tmp_path, workers=1)
    pids = [pid for group in _started_pids(up.output()).values() for pid in group]
    up.signal(signal.SIGINT)
    up.wait_for_output("stopping: gateway", timeout=10)
    up.signal(signal.SIGINT)  # the worker's drain (its 1 s drain delay, at least) has not ended yet
    assert up.popen.wait(timeout=30) == 1
    output = up.output()
    assert "second signal: killing what still runs" in output
    assert "stopped by a second signal" in output
    assert not [line for line in output.splitlines() if "worker-1 |" in line and "drained and stopped" in line]
    wait_until(lambda: not any(_pid_alive(pid) for pid in pids), 5, what="children gone")


def test_up_with_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable, "-m", "meshserve", "up", "--port", str(port), "--registry-port", str(free_port()),
                "--metrics-port", str(free_port()), "--model-repository", str(tmp_path),
            ],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"--port (gateway) {port}" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
