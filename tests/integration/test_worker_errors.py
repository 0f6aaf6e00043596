"""Every row of DESIGN.md's status table a worker can produce, against a real worker process:
the exact code, a message naming the tensor with expected vs. got, no stack trace, and the
process still serves afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.harness import ManagedProcess, ProcessGroup
from tests.worker_models import gather_model, save

pytestmark = pytest.mark.integration

MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors-repo")
    for model in ("digits", "mlp784"):
        (root / model).symlink_to(demo_repository / model)
    # One request at a time and a queue of one: the third concurrent request is refused.
    slow_config = "max_batch_size: 64\nmax_queue_size: 1\nintra_op_threads: 1\n"
    (root / "slowcnn" / "1").mkdir(parents=True)
    (root / "slowcnn" / "1" / "model.onnx").symlink_to(demo_repository / "cnn" / "1" / "model.onnx")
    (root / "slowcnn" / "config.yaml").write_text(slow_config)
    save(gather_model(), root, "gather", config="max_batch_size: 8\n")
    return root


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[tuple[ManagedProcess, str]]:
    with ProcessGroup() as group:
        yield group.worker(repository, "--host", "127.0.0.1", "--max-message-size", str(MAX_MESSAGE))


@pytest.fixture(scope="module")
def client(served: tuple[ManagedProcess, str]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served[1]) as client:
        yield client


def digits_input(array: np.ndarray, datatype: str = "FP32", name: str = "input") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def assert_still_serves(client: triton.InferenceServerClient) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    assert client.infer("digits", [digits_input(x)]).as_numpy("probabilities").shape == (2, 10)


def call_error(
    client: triton.InferenceServerClient, model: str, inputs: list, **kwargs: object
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs, **kwargs)
    error = caught.value
    assert "Traceback" not in str(error)
    return error


def raw_call(address: str, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert "Traceback" not in (caught.value.details() or "")
    return caught.value


def test_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "nope", [digits_input(np.ones((1, 64), np.float32))])
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in error.message()
    assert_still_serves(client)


def test_unknown_version_is_not_found(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "digits", [digits_input(np.ones((1, 64), np.float32))], model_version="7")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "model 'digits' has no version '7'" in error.message()
    assert_still_serves(client)


def test_wrong_input_name(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "digits", [digits_input(np.ones((1, 64), np.float32), name="pixels")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown input 'pixels'" in error.message() and "'input'" in error.message()
    assert_still_serves(client)


def test_wrong_datatype(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "digits", [digits_input(np.ones((1, 64), np.float64), "FP64")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input': expected datatype FP32, got FP64" in error.message()
    assert_still_serves(client)


def test_wrong_shape(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "digits", [digits_input(np.ones((1, 63), np.float32))])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input': expected shape [-1, 64], got [1, 63]" in error.message()
    assert_still_serves(client)


def test_wrong_byte_count(served: tuple[ManagedProcess, str], client: triton.InferenceServerClient) -> None:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\0" * 255)
    error = raw_call(served[1], request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input 'input': expected 256 bytes for shape [1, 64] FP32, got 255"
    assert_still_serves(client)


def test_batch_over_max(client: triton.InferenceServerClient) -> None:
    error = call_error(client, "digits", [digits_input(np.ones((65, 64), np.float32))])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "batch size 65 is outside 1..64" in error.message()
    assert_still_serves(client)


def test_unknown_requested_output(client: triton.InferenceServerClient) -> None:
    error = call_error(
        client,
        "digits",
        [digits_input(np.ones((1, 64), np.float32))],
        outputs=[triton.InferRequestedOutput("scores")],
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output 'scores'" in error.message()
    assert_still_serves(client)


def test_message_too_large_is_resource_exhausted(client: triton.InferenceServerClient) -> None:
    rows = MAX_MESSAGE // (784 * 4) + 8
    error = call_error(client, "mlp784", [digits_input(np.ones((rows, 784), np.float32))])
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert_still_serves(client)


async def test_full_queue_is_resource_exhausted_at_once(served: tuple[ManagedProcess, str]) -> None:
    # Each request is 48 CNN samples (a few hundred ms of CPU); the queue holds one.
    x = np.ones((48, 1, 64, 64), dtype=np.float32)
    async with triton_aio.InferenceServerClient(served[1]) as client:

        async def one() -> str:
            try:
                await client.infer("slowcnn", [digits_input(x)], client_timeout=60)
            except InferenceServerException as error:
                assert "queue is full" in error.message()
                return error.status()
            return "OK"

        codes = await asyncio.gather(*(one() for _ in range(6)))
    assert "StatusCode.RESOURCE_EXHAUSTED" in codes
    assert "OK" in codes
    assert set(codes) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}


async def test_a_request_that_breaks_the_run_fails_alone(served: tuple[ManagedProcess, str]) -> None:
    """Requests batched with one whose run fails (index out of range) still get their answers."""
    async with triton_aio.InferenceServerClient(served[1]) as client:

        async def one(index: int) -> object:
            idx = np.array([[index]], dtype=np.int64)
            try:
                result = await client.infer("gather", [digits_input(idx, "INT64", "idx")])
            except InferenceServerException as error:
                return error
            return float(result.as_numpy("y")[0, 0])

        indices = [i % 10 for i in range(40)]
        indices[17] = 99
        outcomes = await asyncio.gather(*(one(i) for i in indices))
    for index, outcome in zip(indices, outcomes, strict=True):
        if index == 99:
            assert isinstance(outcome, InferenceServerException)
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT"
            assert "failed to run" in outcome.message()
        else:
            assert outcome == index * 10.0


def test_process_survived_every_error(served: tuple[ManagedProcess, str], client) -> None:
    assert served[0].alive()
    assert "Traceback" not in served[0].output()
    assert_still_serves(client)


def test_missing_repository_is_a_clear_start_failure(tmp_path: Path, processes: ProcessGroup) -> None:
    proc = processes.start("worker", "worker", "--model-repository", str(tmp_path / "nowhere"), "--port", "0")
    assert proc.popen.wait(timeout=60) == 1
    assert f"model repository {tmp_path / 'nowhere'} is not a directory" in proc.output()
    assert "Traceback" not in proc.output()
