"""The worker and the mesh on a GPU: every demo model loads on CUDA, the worker advertises `cuda:0`, and
answers under 32 concurrent clients (batched) equal CPU ONNX Runtime within the GPU's float tolerance,
directly and through the gateway.

Skipped where CUDA cannot start, as in CI (no GPU); bench/RESULTS.md records the runs on a GPU host."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from tests.harness import REPO_ROOT, ProcessGroup, host_gpu_env, wait_until

pytestmark = pytest.mark.integration

API_KEY = "gpu-test-key"
CLIENTS = 32
REQUESTS_PER_CLIENT = 8
# cuDNN and cuBLAS may pick TF32 and other accumulation orders: answers differ from the CPU's in the
# third significant digit, not more.
RTOL, ATOL = 1e-2, 1e-3
INPUTS = {
    "mlp784": lambda rng, rows: rng.random((rows, 784), dtype=np.float32),
    "cnn": lambda rng, rows: rng.random((rows, 1, 64, 64), dtype=np.float32),
    "digits": lambda rng, rows: rng.random((rows, 64), dtype=np.float32) * 16,
}


@pytest.fixture(scope="module")
def cuda() -> None:
    """Asks a child with the host's GPUs visible (the tests' own process has them hidden, see conftest.py)."""
    probe = "from worker.runtime import usable_providers; print('CUDAExecutionProvider' in usable_providers())"
    answer = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=host_gpu_env(), capture_output=True, text=True, timeout=120
    )
    if answer.stdout.strip() != "True":
        pytest.skip("CUDA cannot start on this host (no GPU, or no CUDA libraries): " + answer.stderr.strip()[-300:])


@pytest.fixture(scope="module")
def mesh(cuda: None, demo_repository: Path) -> Iterator[tuple[ProcessGroup, str, str, str]]:
    """A registry, one worker on the GPU, a gateway: (group, registry URL, worker address, gateway address)."""
    group = ProcessGroup(gpu=True)
    try:
        _, registry_url = group.registry()
        _, worker = group.worker(demo_repository, "--host", "127.0.0.1", registry_url=registry_url)
        _, gateway = group.gateway(registry_url, "--api-key", API_KEY)
        yield group, registry_url, worker, gateway
    except BaseException:
        print(group.dump_logs())
        raise
    finally:
        group.close()


@functools.cache
def cpu_session(model_file: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def cpu_answers(repository: Path, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    session = cpu_session(repository / model / "1" / "model.onnx")
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))


def test_every_demo_model_loads_on_cuda_and_the_worker_advertises_the_gpu(
    mesh: tuple[ProcessGroup, str, str, str],
) -> None:
    group, registry_url, _, _ = mesh
    worker_log = next(p for p in group.processes if p.name.startswith("worker")).output()
    for model in INPUTS:
        assert f"loaded model {model} version 1 on CUDAExecutionProvider" in worker_log, worker_log[-3000:]
    # One input shape for a model with convolutions on CUDA (`batch_padding: auto`): a changing one rebuilds
    # cuDNN's Conv plans. The MLPs keep their batch sizes.
    assert "model cnn version 1: every batch is padded to 32 rows" in worker_log, worker_log[-3000:]
    assert "model mlp784 version 1: every batch is padded" not in worker_log

    def advertised() -> list[dict]:
        url = registry_url.replace("consul://", "http://") + "/v1/health/service/meshserve-worker?passing"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply)

    wait_until(lambda: len(advertised()) == 1, 30, what="the GPU worker passing its health check")
    assert advertised()[0]["Service"]["Meta"]["device"] == "cuda:0"


@pytest.mark.parametrize("through", ["worker", "gateway"])
@pytest.mark.parametrize("model", ["cnn", "mlp784"])
def test_batched_answers_on_the_gpu_equal_cpu_onnx_runtime(
    model: str, through: str, mesh: tuple[ProcessGroup, str, str, str], demo_repository: Path
) -> None:
    _, _, worker, gateway = mesh
    address, headers = (worker, None) if through == "worker" else (gateway, {"authorization": f"Bearer {API_KEY}"})
    rng = np.random.default_rng(11)
    requests = [INPUTS[model](rng, 1 + i % 3) for i in range(CLIENTS * REQUESTS_PER_CLIENT)]

    def call(client_index: int) -> list[tuple[np.ndarray, triton.InferResult]]:
        answers = []
        with triton.InferenceServerClient(address) as client:
            for x in requests[client_index::CLIENTS]:
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                answers.append((x, client.infer(model, [tensor], headers=headers)))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [pair for chunk in pool.map(call, range(CLIENTS)) for pair in chunk]

    assert len(answers) == len(requests)
    batch_sizes = []
    for x, result in answers:
        for name, want in cpu_answers(demo_repository, model, x).items():
            np.testing.assert_allclose(result.as_numpy(name), want, rtol=RTOL, atol=ATOL)
        batch_sizes.append(result.get_response().parameters["meshserve.batch_size"].int64_param)
    # Each request has 1-3 rows: a run of more rows coalesced requests (the worker's parameter reaches the gateway's
    # clients unchanged).
    assert max(batch_sizes) > 3, "no batch was formed on the GPU"
