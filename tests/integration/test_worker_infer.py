"""A real worker process, called with the stock tritonclient: outputs equal in-process ONNX Runtime."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.harness import ManagedProcess, ProcessGroup, free_port
from tests.worker_models import DATATYPES, write_test_repository

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_repository(tmp_path_factory.mktemp("worker-repo"), demo_repository)


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[tuple[ManagedProcess, str]]:
    with ProcessGroup() as group:
        port = free_port()
        # An empty CUDA_VISIBLE_DEVICES makes CUDA unusable even on a GPU host: the CPU fallback path.
        proc = group.start(
            "worker",
            "worker",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env={"CUDA_VISIBLE_DEVICES": ""},
        )
        address = f"127.0.0.1:{port}"
        proc.wait_serving(address)
        yield proc, address


@pytest.fixture(scope="module")
def client(served: tuple[ManagedProcess, str]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served[1]) as client:
        yield client


def local_run(repository: Path, name: str, feeds: dict[str, np.ndarray], version: int = 1) -> list[np.ndarray]:
    session = ort.InferenceSession(
        str(repository / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def triton_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


DEMO_INPUTS = {
    "digits": lambda: RNG.random((5, 64), dtype=np.float32) * 16,
    "mlp784": lambda: RNG.random((4, 784), dtype=np.float32),
    "cnn": lambda: RNG.random((2, 1, 64, 64), dtype=np.float32),
}


@pytest.mark.parametrize("model", sorted(DEMO_INPUTS))
def test_demo_model_outputs_equal_onnx_runtime_raw(
    model: str, client: triton.InferenceServerClient, repository: Path
) -> None:
    x = DEMO_INPUTS[model]()
    result = client.infer(model, [triton_input("input", x, "FP32")])
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})
    for output, want in zip(session.get_outputs(), expected, strict=True):
        got = result.as_numpy(output.name)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.model_name == model
    assert response.model_version == "1"
    assert response.parameters["meshserve.batch_size"].int64_param >= x.shape[0]


def test_requested_output_only(client: triton.InferenceServerClient, repository: Path) -> None:
    x = DEMO_INPUTS["digits"]()
    result = client.infer("digits", [triton_input("input", x, "FP32")], outputs=[triton.InferRequestedOutput("label")])
    assert [o.name for o in result.get_response().outputs] == ["label"]
    np.testing.assert_array_equal(result.as_numpy("label"), local_run(repository, "digits", {"input": x})[0])


def typed_request(model: str, name: str, array: np.ndarray, datatype: str) -> service_pb2.ModelInferRequest:
    """A request with typed `contents` (tritonclient itself always sends raw bytes)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    flat = array.reshape(-1)
    if datatype == "BYTES":
        tensor.contents.bytes_contents.extend(flat.tolist())
    elif datatype == "BOOL":
        tensor.contents.bool_contents.extend(flat.tolist())
    elif datatype in ("FP32", "FP16"):
        tensor.contents.fp32_contents.extend(flat.astype(np.float32).tolist())
    elif datatype == "FP64":
        tensor.contents.fp64_contents.extend(flat.tolist())
    elif datatype == "INT64":
        tensor.contents.int64_contents.extend(flat.tolist())
    elif datatype.startswith("UINT"):
        tensor.contents.uint_contents.extend(flat.tolist())
    else:
        tensor.contents.int_contents.extend(flat.tolist())
    return request


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"a", b"", "\u00e9t\u00e9".encode()]] * rows, dtype=np.object_)
    if datatype == "BOOL":
        return RNG.random((rows, 3)) > 0.5
    dtype = triton.triton_to_np_dtype(datatype)
    if np.issubdtype(dtype, np.floating):
        return (RNG.standard_normal((rows, 3)) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=(rows, 3), dtype=dtype, endpoint=True)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_raw(datatype: str, client: triton.InferenceServerClient) -> None:
    x = sample(datatype)
    result = client.infer(f"identity_{datatype.lower()}", [triton_input("x", x, datatype)])
    output = result.get_response().outputs[0]
    assert output.datatype == datatype
    assert list(output.shape) == [2, 3]
    np.testing.assert_array_equal(result.as_numpy("y"), x)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_typed(datatype: str, served: tuple[ManagedProcess, str]) -> None:
    x = sample(datatype)
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(typed_request(f"identity_{datatype.lower()}", "x", x, datatype), timeout=10)
    result = triton.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_typed_contents_on_a_demo_model(served: tuple[ManagedProcess, str], repository: Path) -> None:
    x = DEMO_INPUTS["mlp784"]()
    with grpc.insecure_channel(served[1]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            typed_request("mlp784", "input", x, "FP32"), timeout=10
        )
    expected = local_run(repository, "mlp784", {"input": x})[0]
    np.testing.assert_allclose(triton.InferResult(response).as_numpy("probabilities"), expected, rtol=1e-5)


def test_versions_side_by_side(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    one = client.infer("add", [triton_input("x", x, "FP32")], model_version="1").as_numpy("y")
    two = client.infer("add", [triton_input("x", x, "FP32")], model_version="2").as_numpy("y")
    newest = client.infer("add", [triton_input("x", x, "FP32")])
    np.testing.assert_array_equal(one, x + 1)
    np.testing.assert_array_equal(two, x + 2)
    assert newest.get_response().model_version == "2"
    assert client.is_model_ready("add", "1") and client.is_model_ready("add", "2")
    assert sorted(client.get_model_metadata("add").versions) == ["1", "2"]


def test_static_shape_model_is_served_unbatched(client: triton.InferenceServerClient) -> None:
    x = RNG.random((2, 3), dtype=np.float32)
    result = client.infer("static", [triton_input("x", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("y"), 2 * x)
    np.testing.assert_allclose(result.as_numpy("s"), x.sum(), rtol=1e-6)
    metadata = client.get_model_metadata("static")
    assert list(metadata.inputs[0].shape) == [2, 3]


def test_broken_model_is_reported_and_others_load(served: tuple[ManagedProcess, str], client) -> None:
    proc, _ = served
    log = proc.output()
    assert "cannot serve model broken:1" in log
    assert "broken/1/model.onnx" in log
    assert "cannot serve model badconfig" in log and "badconfig/config.yaml" in log
    assert not client.is_model_ready("badconfig")
    assert not client.is_model_ready("broken")
    for model in ("digits", "mlp784", "cnn", "add", "static", "gather"):
        assert client.is_model_ready(model), model


def test_cpu_fallback_is_logged_per_model(served: tuple[ManagedProcess, str]) -> None:
    # The default config asks for CUDA first; with CUDA hidden every model runs on the CPU provider.
    log = served[0].output()
    for model in ("digits", "mlp784", "cnn"):
        assert f"loaded model {model} version 1 on CPUExecutionProvider" in log


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "meshserve"
    metadata = client.get_model_metadata("digits")
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 64])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {"label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])}
    assert not client.is_model_ready("nope")


def test_reflection_lists_the_services(served: tuple[ManagedProcess, str]) -> None:
    with grpc.insecure_channel(served[1]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "meshserve.v1.MeshAdmin"} <= names


def test_load_report_in_trailing_metadata(served: tuple[ManagedProcess, str]) -> None:
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(typed_request("add", "x", np.zeros((1, 4), np.float32), "FP32"), timeout=10)
    trailer = dict(call.trailing_metadata())
    assert int(trailer["meshserve-queue-depth"]) == 0
    assert int(trailer["meshserve-in-flight"]) == 0  # nothing else is in flight once this one is answered


def test_metrics_endpoint(served: tuple[ManagedProcess, str], client: triton.InferenceServerClient) -> None:
    client.infer("add", [triton_input("x", np.zeros((1, 4), np.float32), "FP32")])
    log = served[0].output()
    port = int(log.split("metrics on http://127.0.0.1:")[1].split("/")[0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'meshserve_requests_total{code="OK",component="worker",model="add"}' in text
    assert "meshserve_request_duration_seconds_bucket" in text
    assert 'meshserve_batch_size_count{component="worker",model="add"}' in text
    assert "meshserve_queue_depth" in text
