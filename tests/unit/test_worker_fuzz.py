"""Property-based fuzzing of shapes, datatypes and byte counts against the worker's servicer,
served in-process on a real grpc.aio server (its own event loop thread) and called over loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.worker_models import DATATYPES, add_model, identity_model, save, static_model
from worker.engine import InferenceEngine
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository
from worker.servicer import InferenceServicer

MODELS = {
    "add": ("x", "FP32"),
    "static": ("x", "FP32"),
    "identity_bytes": ("x", "BYTES"),
    "identity_int8": ("x", "INT8"),
}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
# Every refusal says what was wrong in words like these.
ACTIONABLE = (
    "expected",
    "got",
    "unknown",
    "missing",
    "outside",
    "twice",
    "UTF-8",
    "fit",
    "has no version",
    "truncated",
    "declares",
)


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz-repo")
    save(add_model(1.0), root, "add", config="max_batch_size: 8\n")
    save(static_model(), root, "static")
    save(identity_model("BYTES"), root, "identity_bytes")
    save(identity_model("INT8"), root, "identity_int8")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def serve() -> None:
        executor = ThreadPoolExecutor(max_workers=2)
        repository = ModelRepository(Path(root), executor, WorkerMetrics())
        await repository.load_all()
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(InferenceEngine(repository, WorkerMetrics())), server
        )
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["stop"] = asyncio.Event()
        ready.set()
        await state["stop"].wait()  # type: ignore[attr-defined]
        await server.stop(0)
        await repository.close()
        executor.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield f"127.0.0.1:{state['port']}"
    loop.call_soon_threadsafe(state["stop"].set)  # type: ignore[attr-defined]
    thread.join(30)
    loop.close()


VALID_SHAPES = {"add": [-1, 4], "static": [2, 3], "identity_bytes": [-1, 3], "identity_int8": [-1, 3]}
ITEMSIZE = {"FP32": 4, "INT8": 1}


@st.composite
def shapes(draw: st.DrawFn, model: str) -> list[int]:
    """Mostly a shape the model accepts (batch 0..10), else anything."""
    valid = VALID_SHAPES.get(model)
    if valid and draw(st.integers(0, 3)):
        return [draw(st.integers(min_value=0, max_value=10)) if d == -1 else d for d in valid]
    return draw(st.lists(st.integers(min_value=-2, max_value=12), max_size=4))


@st.composite
def payloads(draw: st.DrawFn, datatype: str, count: int) -> bytes:
    """Raw contents: mostly the right size (BYTES: well framed), else any bytes."""
    if not draw(st.integers(0, 3)):
        return draw(st.binary(max_size=64))
    if datatype == "BYTES":
        items = draw(st.lists(st.text(max_size=5), min_size=count, max_size=count))
        return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in items)
    size = count * ITEMSIZE.get(datatype, 1)
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    model = draw(st.sampled_from([*MODELS, *MODELS, "missing"]))
    name, datatype = MODELS.get(model, ("x", "FP32"))
    # Most fields right most of the time, so requests get past one check and fail (or pass) the next.
    request = pb.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "", "1", "2"])))
    tensor = request.inputs.add(
        name=name if draw(st.integers(0, 4)) else "y",
        datatype=datatype if draw(st.integers(0, 4)) else draw(st.sampled_from([*DATATYPES, "FP8", ""])),
        shape=draw(shapes(model)),
    )
    count = int(np.prod([max(d, 0) for d in tensor.shape])) if tensor.shape else 1
    how = draw(st.sampled_from(["raw", "raw", "typed", "two-raw"]))
    if how == "raw":
        request.raw_input_contents.append(draw(payloads(tensor.datatype, count)))
    elif how == "two-raw":
        request.raw_input_contents.extend([b"", b""])
    else:
        values = draw(st.lists(st.integers(min_value=-200, max_value=200), min_size=count, max_size=count + 1))
        tensor.contents.int_contents.extend(values)
        tensor.contents.fp32_contents.extend(float(v) for v in values)
        tensor.contents.bytes_contents.extend(str(v).encode() for v in values)
    if draw(st.integers(0, 3)) == 0:
        request.outputs.add(name=draw(st.sampled_from(["y", "s", "nope"])))
    return request


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_fuzzed_requests_get_a_clean_answer(address: str, request: pb.ModelInferRequest) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as error:
            event(error.code().name)
            assert error.code() in ALLOWED, (error.code(), error.details())
            assert error.details() and "Traceback" not in error.details()
            assert any(word in error.details() for word in ACTIONABLE), error.details()
            return
    event("OK")
    assert len(response.outputs) == len(response.raw_output_contents) >= 1


def test_still_serves_after_fuzzing(address: str) -> None:
    request = pb.ModelInferRequest(model_name="add")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), np.ones(4))
