"""`meshserve bench` as a user runs it, against a real worker process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, ProcessGroup, free_port, wait_until

pytestmark = pytest.mark.integration


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve", "bench", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_measures_each_level_and_writes_json(
    demo_repository: Path, processes: ProcessGroup, tmp_path: Path
) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    out = tmp_path / "bench.json"
    done = bench(
        "mlp784", "--url", address, "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2", "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "req/s" in done.stdout and "p99 ms" in done.stdout

    report = json.loads(out.read_text())
    assert report["model"] == "mlp784" and report["url"] == address
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["requests"] > 0
        assert level["errors"] == {}
        assert level["throughput"] > 0
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]


def test_bench_counts_rejections_by_status_code(demo_repository: Path, processes: ProcessGroup, tmp_path: Path) -> None:
    # A copy of mlp784 whose queue holds one request and whose batches hold one:
    # 16 clients in flight must overflow it.
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "mlp784", repository / "mlp784")
    (repository / "mlp784" / "config.yaml").write_text("max_batch_size: 1\nmax_queue_size: 1\n")
    _, address = processes.worker(repository, "--host", "127.0.0.1")
    out = tmp_path / "bench.json"
    done = bench(
        "mlp784", "--url", address, "--concurrency", "16", "--duration", "1", "--warmup", "0", "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [level] = json.loads(out.read_text())["levels"]
    assert level["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert set(level["errors"]) == {"RESOURCE_EXHAUSTED"}
    assert level["requests"] > 0
    assert "RESOURCE_EXHAUSTED" in done.stdout


def test_bench_on_an_unknown_model_says_so_without_a_traceback(demo_repository: Path, processes: ProcessGroup) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    done = bench("no-such-model", "--url", address, "--duration", "1")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_bench_through_the_gateway_sends_the_api_key(demo_repository: Path, processes: ProcessGroup) -> None:
    import tritonclient.grpc as triton

    _, registry_url = processes.registry()
    processes.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
    port = free_port()
    gateway = processes.start(
        "gateway", "gateway", "--registry", registry_url, "--host", "127.0.0.1", "--port", str(port),
        "--api-key", "bench-key", "--metrics-port", str(free_port()),
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    gateway.wait_serving(address)
    client = triton.InferenceServerClient(address)
    wait_until(
        lambda: client.is_model_ready("digits", headers={"authorization": "Bearer bench-key"}), 30, what="digits"
    )

    done = bench("digits", "--url", address, "--api-key", "bench-key", "--concurrency", "2", "--duration", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "errors by status code" not in done.stdout

    refused = bench("digits", "--url", address, "--api-key", "wrong-key", "--duration", "1")
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stdout


def test_bench_rejects_bad_levels() -> None:
    done = bench("mlp784", "--concurrency", "0,8")
    assert done.returncode == 2
    assert "concurrency" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
