"""Dynamic batching under 32 concurrent tritonclient.aio clients against a real worker."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

from tests.harness import ProcessGroup
from tests.worker_models import save, slow_model

pytestmark = pytest.mark.integration

CLIENTS = 32
REQUESTS_PER_CLIENT = 8


async def answered_by_concurrent_clients(
    address: str, model: str, model_file: Path, sample_shape: tuple[int, ...]
) -> list[int]:
    """32 tritonclient.aio clients, 8 requests each; checks every answer against in-process ONNX Runtime
    and returns the batch size the worker reported for each request."""
    rng = np.random.default_rng(3)
    inputs = rng.random((CLIENTS, REQUESTS_PER_CLIENT, 1, *sample_shape), dtype=np.float32)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    batch_sizes: list[int] = []
    answers: list[tuple[np.ndarray, np.ndarray]] = []

    async with triton_aio.InferenceServerClient(address) as client:

        async def one_client(index: int) -> None:
            # Nothing but the call between two requests: checking each answer here (an ORT run in
            # the test process) would spread the clients' sends out and leave little to batch.
            for step in range(REQUESTS_PER_CLIENT):
                x = inputs[index, step]
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer(model, [tensor], client_timeout=60)
                answers.append((x, result.as_numpy("probabilities")))
                batch_sizes.append(result.get_response().parameters["meshserve.batch_size"].int64_param)

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))

    for x, got in answers:
        np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-6)
    assert len(batch_sizes) == CLIENTS * REQUESTS_PER_CLIENT
    assert max(batch_sizes) > 1, batch_sizes
    return batch_sizes


@pytest.mark.parametrize("model", ["mlp784", "cnn"])
async def test_concurrent_clients_are_batched_and_answered_correctly(
    model: str, demo_repository: Path, processes: ProcessGroup
) -> None:
    proc, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    sample_shape = (784,) if model == "mlp784" else (1, 64, 64)
    await answered_by_concurrent_clients(address, model, demo_repository / model / "1" / "model.onnx", sample_shape)
    # The metric tells the same story.
    port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", proc.output()).group(1))
    text = (await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", timeout=5)).read()
    text = text.decode()
    count = float(re.search(rf'meshserve_batch_size_count{{component="worker",model="{model}"}} (\S+)', text).group(1))
    total = float(re.search(rf'meshserve_batch_size_sum{{component="worker",model="{model}"}} (\S+)', text).group(1))
    assert total == CLIENTS * REQUESTS_PER_CLIENT  # every request's one row, counted once (warm-up is not)
    assert count < total  # fewer runs than requests: batches merged requests


async def test_padded_batches_answer_every_request_with_its_own_rows(
    demo_repository: Path, tmp_path: Path, processes: ProcessGroup
) -> None:
    """`batch_padding: always` (what CUDA gets by default) on the CPU: every run is 16 rows, the answers are not."""
    model_file = demo_repository / "mlp784" / "1" / "model.onnx"
    (tmp_path / "mlp784" / "1").mkdir(parents=True)
    shutil.copy(model_file, tmp_path / "mlp784" / "1" / "model.onnx")
    (tmp_path / "mlp784" / "config.yaml").write_text("max_batch_size: 16\nbatch_padding: always\n")
    proc, address = processes.worker(tmp_path, "--host", "127.0.0.1")
    assert "model mlp784 version 1: every batch is padded to 16 rows" in proc.output()
    batch_sizes = await answered_by_concurrent_clients(address, "mlp784", model_file, (784,))
    assert max(batch_sizes) <= 16


def abandoned_runs(proc_output: str, model: str) -> float:
    port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", proc_output).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf'meshserve_abandoned_runs_total{{component="worker",model="{model}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_gives_up_stops_the_run_it_waited_for(tmp_path: Path, processes: ProcessGroup) -> None:
    """The client's deadline passes mid-run: gRPC cancels the request, and with nobody left waiting
    the worker stops ONNX Runtime instead of computing an answer for no one for seconds."""
    save(slow_model(width=1024, depth=512), tmp_path, "slow", config="max_batch_size: 512\nintra_op_threads: 1\n")
    proc, address = processes.worker(tmp_path, "--host", "127.0.0.1")
    client = triton.InferenceServerClient(address)
    big = triton.InferInput("input", [512, 1024], "FP32")  # ~3 s of ONNX Runtime on one thread here
    big.set_data_from_numpy(np.ones((512, 1024), np.float32))
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer("slow", [big], client_timeout=0.5)
    assert "DEADLINE_EXCEEDED" in str(caught.value.status())
    # Counted only once ONNX Runtime returned early on the terminate flag.
    for _ in range(200):
        if abandoned_runs(proc.output(), "slow") == 1:
            break
        time.sleep(0.05)
    assert abandoned_runs(proc.output(), "slow") == 1
    small = triton.InferInput("input", [1, 1024], "FP32")
    small.set_data_from_numpy(np.full((1, 1024), 2, np.float32))
    np.testing.assert_array_equal(client.infer("slow", [small]).as_numpy("output"), np.full((1, 1024), 2, np.float32))
    client.close()
