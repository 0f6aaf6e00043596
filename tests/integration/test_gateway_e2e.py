"""End to end through a real gateway, with the stock tritonclient: results, metadata, versions,
canary weights, rollback, and the authentication matrix.

One mesh for the module: the embedded registry, two workers serving digits v1+v2 and mlp784,
and a gateway with an auth file (API-key tenants, a rate-limited tenant, HS256 and RS256 JWTs).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.auth import hash_key
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc
from tests.harness import REPO_ROOT, ProcessGroup, free_port, wait_until

pytestmark = pytest.mark.integration

FULL_KEY = "key-full-access"
DIGITS_KEY = "key-digits-only"
LIMITED_KEY = "key-rate-limited"
ADMIN_KEY = "key-admin"
HS_SECRET = "hs256-secret-for-the-gateway-tests-0123456789"


@dataclass
class Mesh:
    address: str
    tls_address: str
    ca_pem: bytes
    registry_url: str
    auth_file: Path
    repository: Path
    rsa_private: bytes
    rsa_public: str
    group: ProcessGroup


def _auth_yaml(rsa_public: str, full_keys: list[str]) -> str:
    return yaml.safe_dump(
        {
            "tenants": {
                "full": {"models": ["*"], "keys": [{"sha256": hash_key(k)} for k in full_keys]},
                "digits-team": {"models": ["digits*"], "keys": [{"sha256": hash_key(DIGITS_KEY)}]},
                "limited": {"models": ["*"], "rate_limit": 1, "burst": 2, "keys": [{"sha256": hash_key(LIMITED_KEY)}]},
                "ops": {"models": ["*"], "admin": True, "keys": [{"sha256": hash_key(ADMIN_KEY)}]},
            },
            "jwt": {"audience": "meshserve", "hs256_secret": HS_SECRET, "rs256_public_key": rsa_public},
        }
    )


def _meshserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def mesh(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("gateway-e2e")
    repository = root / "repo"
    for model in ("digits", "mlp784"):
        shutil.copytree(demo_repository / model, repository / model)
    shutil.copytree(repository / "digits" / "1", repository / "digits" / "2")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth_file = root / "auth.yaml"
    auth_file.write_text(_auth_yaml(public, [FULL_KEY]))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(root / "cert.pem")
    cert.private_key_pem.write_to_path(root / "key.pem")

    group = ProcessGroup()
    try:
        _, registry_url = group.registry()
        for _ in range(2):
            group.worker(repository, "--host", "127.0.0.1", registry_url=registry_url)
        port, tls_port = free_port(), free_port()
        common = ["--registry", registry_url, "--host", "127.0.0.1", "--metrics-port", "0"]
        gateway = group.start("gateway", "gateway", *common, "--port", str(port), "--auth-file", str(auth_file))
        tls_gateway = group.start(
            "gateway-tls", "gateway", *common, "--port", str(tls_port), "--api-key", FULL_KEY,
            "--tls-cert", str(root / "cert.pem"), "--tls-key", str(root / "key.pem"),
        )  # fmt: skip
        address = f"127.0.0.1:{port}"
        gateway.wait_serving(address)
        # Both workers, all versions, before any test counts versions.
        client = triton.InferenceServerClient(address)
        wait_until(lambda: _served_versions(client) == {"1", "2"}, 30, what="digits v1 and v2 served")
        tls_gateway.wait_for_output("gateway serving on")
        yield Mesh(
            address, f"127.0.0.1:{tls_port}", ca.cert_pem.bytes(), registry_url, auth_file, repository,
            private, public, group,
        )  # fmt: skip
    except BaseException:
        print(group.dump_logs())
        raise
    finally:
        group.close()


def _served_versions(client: triton.InferenceServerClient) -> set[str]:
    try:
        return set(client.get_model_metadata("digits", headers=_bearer(FULL_KEY)).versions)
    except InferenceServerException:
        return set()


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _digits_input(batch: int = 1, seed: int = 0) -> tuple[np.ndarray, triton.InferInput]:
    x = np.random.default_rng(seed).random((batch, 64), dtype=np.float32) * 16
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return x, tensor


def _status(exc: InferenceServerException) -> str:
    return exc.status() or ""


# -- results, metadata, versions ----------------------------------------------------------


@pytest.mark.parametrize("model, features", [("mlp784", 784), ("digits", 64)])
def test_results_equal_in_process_onnxruntime(mesh: Mesh, model: str, features: int) -> None:
    client = triton.InferenceServerClient(mesh.address)
    metadata = client.get_model_metadata(model, headers=_bearer(FULL_KEY))
    session = ort.InferenceSession(
        str(mesh.repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, features), dtype=np.float32)
        tensor = triton.InferInput(metadata.inputs[0].name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], headers=_bearer(FULL_KEY), request_id=f"client-{batch}")
        expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))
        assert result.get_response().id == f"client-{batch}"  # the client's id, not the hop's
        for output in metadata.outputs:
            np.testing.assert_allclose(result.as_numpy(output.name), expected[output.name], rtol=1e-5, atol=1e-6)


def test_metadata_and_readiness(mesh: Mesh) -> None:
    client = triton.InferenceServerClient(mesh.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", headers=_bearer(FULL_KEY))
    assert client.is_model_ready("digits", "1", headers=_bearer(FULL_KEY))
    metadata = client.get_model_metadata("mlp784", headers=_bearer(FULL_KEY))
    assert metadata.name == "mlp784"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 784])]
    for call in (
        lambda: client.get_model_metadata("nope", headers=_bearer(FULL_KEY)),
        lambda: client.is_model_ready("nope", headers=_bearer(FULL_KEY)),
        lambda: client.infer("nope", [_digits_input()[1]], headers=_bearer(FULL_KEY)),
        lambda: client.infer("digits", [_digits_input()[1]], model_version="9", headers=_bearer(FULL_KEY)),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert _status(info.value) == "StatusCode.NOT_FOUND"


def test_health_and_reflection_need_no_key(mesh: Mesh) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(mesh.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert "inference.GRPCInferenceService" in names


def test_explicit_version_gets_exactly_that_version(mesh: Mesh) -> None:
    client = triton.InferenceServerClient(mesh.address)
    for version in ("1", "2", "1"):
        result = client.infer("digits", [_digits_input()[1]], model_version=version, headers=_bearer(FULL_KEY))
        assert result.get_response().model_version == version
    # Without a route the newest version answers.
    assert client.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY)).get_response().model_version == "2"


def test_raw_generated_stubs_and_typed_contents(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="mlp784", id="raw-1")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
        tensor.contents.fp32_contents.extend([0.5] * 784)
        response = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {FULL_KEY}"),), timeout=10)
        assert response.id == "raw-1"
        probabilities = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        assert probabilities.shape == (10,) and abs(float(probabilities.sum()) - 1.0) < 1e-4


# -- canary and rollback ----------------------------------------------------------------------


async def _count_versions(address: str, total: int, concurrency: int = 16) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    _, tensor = _digits_input()
    async with triton_aio.InferenceServerClient(address) as client:

        async def sender(n: int) -> None:
            for _ in range(n):
                result = await client.infer("digits", [tensor], headers=_bearer(FULL_KEY))
                counts[result.get_response().model_version] += 1

        await asyncio.gather(*(sender(total // concurrency) for _ in range(concurrency)))
    return counts


async def test_canary_weights_then_rollback_within_one_second(mesh: Mesh) -> None:
    rollout = _meshserve(
        "model", "rollout", "digits", "--version", "2", "--weight", "10", "--registry", mesh.registry_url
    )
    assert rollout.returncode == 0, rollout.stderr
    client = triton.InferenceServerClient(mesh.address)
    # Applied within a second by the gateway (the route pins 90% on v1).
    wait_until(lambda: _mostly_v1(client), 2, what="canary route applied")

    counts = await _count_versions(mesh.address, 2000)
    assert sum(counts.values()) == 2000
    assert abs(counts["2"] / 2000 - 0.10) <= 0.05, counts

    rollback = _meshserve("model", "rollback", "digits", "--registry", mesh.registry_url)
    assert rollback.returncode == 0, rollback.stderr
    rolled_back_at = time.monotonic()
    _, tensor = _digits_input()
    streak_started = None
    streak = 0
    while streak < 100:
        version = client.infer("digits", [tensor], headers=_bearer(FULL_KEY)).get_response().model_version
        if version == "1":
            streak_started = streak_started or time.monotonic()
            streak += 1
        else:
            streak_started, streak = None, 0
        assert time.monotonic() - rolled_back_at < 10, "rollback never took effect"
    assert streak_started is not None and streak_started - rolled_back_at <= 1.0
    # The route is back to what it was before the canary: v1 pinned.
    second = _meshserve("model", "rollback", "digits", "--registry", mesh.registry_url)
    assert second.returncode == 1 and "nothing to roll back" in second.stderr


def _mostly_v1(client: triton.InferenceServerClient) -> bool:
    versions = [
        client.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY)).get_response().model_version
        for _ in range(20)
    ]
    return versions.count("1") >= 12


# -- authentication matrix --------------------------------------------------------------------


def _jwt(mesh: Mesh, algorithm: str = "HS256", **claims: object) -> str:
    now = int(time.time())
    body = {"tenant": "full", "aud": "meshserve", "exp": now + 60, **claims}
    key = HS_SECRET if algorithm == "HS256" else mesh.rsa_private
    return jwt.encode(body, key, algorithm=algorithm)


def _infer_code(mesh: Mesh, headers: dict[str, str] | None, model: str = "digits") -> str:
    client = triton.InferenceServerClient(mesh.address)
    _, tensor = _digits_input()
    if model == "mlp784":
        tensor = triton.InferInput("input", [1, 784], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 784), dtype=np.float32))
    try:
        client.infer(model, [tensor], headers=headers)
    except InferenceServerException as exc:
        return _status(exc)
    return "OK"


def test_auth_matrix(mesh: Mesh) -> None:
    now = int(time.time())
    assert _infer_code(mesh, None) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, {"authorization": FULL_KEY}) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, {"authorization": "Basic Zm9vOmJhcg=="}) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, _bearer("not-a-key")) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, _bearer(_jwt(mesh, exp=now - 5))) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, _bearer(_jwt(mesh, aud="someone-else"))) == "StatusCode.UNAUTHENTICATED"
    assert _infer_code(mesh, _bearer(_jwt(mesh))) == "OK"
    assert _infer_code(mesh, _bearer(_jwt(mesh, "RS256"))) == "OK"
    assert _infer_code(mesh, _bearer(DIGITS_KEY)) == "OK"
    assert _infer_code(mesh, _bearer(DIGITS_KEY), model="mlp784") == "StatusCode.PERMISSION_DENIED"
    # Metadata needs a key too.
    with pytest.raises(InferenceServerException) as info:
        triton.InferenceServerClient(mesh.address).get_model_metadata("digits")
    assert _status(info.value) == "StatusCode.UNAUTHENTICATED"


def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="mlp784")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
        request.raw_input_contents.append(np.zeros(784, dtype=np.float32).tobytes())
        metadata = (("authorization", f"Bearer {LIMITED_KEY}"),)
        codes = []
        hints = []
        for _ in range(6):
            try:
                stub.ModelInfer(request, metadata=metadata, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())  # type: ignore[attr-defined]
                hints += [v for k, v in exc.trailing_metadata() or () if k == "retry-after-ms"]  # type: ignore[attr-defined]
    assert codes[:2] == [grpc.StatusCode.OK, grpc.StatusCode.OK]  # the burst
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert hints and all(0 < int(h) <= 1000 for h in hints)
    # Other tenants are not affected.
    assert _infer_code(mesh, _bearer(FULL_KEY)) == "OK"


def test_key_rotation_in_the_auth_file_without_restart(mesh: Mesh) -> None:
    created = _meshserve("keys", "create", "--tenant", "full", "--auth-file", str(mesh.auth_file))
    assert created.returncode == 0, created.stderr
    new_key = created.stdout.strip()
    assert new_key and new_key not in mesh.auth_file.read_text()  # only the hash is stored
    wait_until(lambda: _infer_code(mesh, _bearer(new_key)) == "OK", 5, what="new key accepted")
    # Retire the old key: rewrite the file with only the new one.
    mesh.auth_file.write_text(_auth_yaml(mesh.rsa_public, [new_key]))
    wait_until(lambda: _infer_code(mesh, _bearer(FULL_KEY)) == "StatusCode.UNAUTHENTICATED", 5, what="old key refused")
    assert _infer_code(mesh, _bearer(new_key)) == "OK"
    mesh.auth_file.write_text(_auth_yaml(mesh.rsa_public, [FULL_KEY]))
    wait_until(lambda: _infer_code(mesh, _bearer(FULL_KEY)) == "OK", 5, what="old key restored")


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_on_the_public_port(mesh: Mesh, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(mesh.ca_pem)
    client = triton.InferenceServerClient(mesh.tls_address, ssl=True, root_certificates=str(ca_file))
    result = client.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY))
    assert result.as_numpy("probabilities").shape == (1, 10)
    # A plaintext client cannot talk to the TLS port.
    plain = triton.InferenceServerClient(mesh.tls_address)
    with pytest.raises(InferenceServerException):
        plain.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY), client_timeout=5)


# -- several gateway processes on one port -----------------------------------------------------


def test_processes_share_the_port_and_stop_together(mesh: Mesh) -> None:
    port = free_port()
    gateway = mesh.group.start(
        f"gateway-x2-{port}", "gateway", "--registry", mesh.registry_url, "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", "0", "--api-key", FULL_KEY, "--processes", "2",
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    gateway.wait_serving(address)
    wait_until(lambda: gateway.output().count("gateway serving on") == 2, 20, what="two gateway processes")
    # One registry entry for the port the two share, not one per process.
    with urllib.request.urlopen(mesh.registry_url.replace("consul://", "http://") + "/v1/agent/services") as reply:
        services = json.load(reply).values()
    entries = [s for s in services if s["Service"] == "meshserve-gateway" and s["Port"] == port]
    assert [entry["Meta"]["processes"] for entry in entries] == ["2"]
    for _ in range(20):
        client = triton.InferenceServerClient(address)  # new connections spread over the processes
        assert client.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY)).as_numpy("label").shape == (1,)
        client.close()
    children = [int(line.split()[0]) for line in _ps_children(gateway.pid)]
    assert len(children) == 1
    assert gateway.stop(timeout=20) == 0
    wait_until(lambda: not _ps_children(gateway.pid) and not Path(f"/proc/{children[0]}").exists(), 10,
               what="sibling gateway stopped")  # fmt: skip
    # They drain side by side: the first passes its SIGTERM on at once, not after its own drain.
    lines = gateway.output().splitlines()
    began = [index for index, line in enumerate(lines) if "draining:" in line]
    ended = [index for index, line in enumerate(lines) if "drained and stopped" in line]
    assert len(began) == len(ended) == 2, lines[-20:]
    assert max(began) < min(ended), lines[-20:]


def _ps_children(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_worker_errors_pass_through_with_their_code_and_message(mesh: Mesh) -> None:
    client = triton.InferenceServerClient(mesh.address)
    tensor = triton.InferInput("input", [1, 63], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor], headers=_bearer(FULL_KEY))
    assert _status(info.value) == "StatusCode.INVALID_ARGUMENT"
    assert "input" in info.value.message() and "Traceback" not in info.value.message()
    # Garbage instead of a ModelInferRequest is refused at the gateway.
    with grpc.insecure_channel(mesh.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raw:
            call(b"\x0a\xff\xff", metadata=(("authorization", f"Bearer {FULL_KEY}"),), timeout=5)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_trace_id_comes_back_and_continues_the_clients_trace(mesh: Mesh) -> None:
    port = free_port()
    gateway = mesh.group.start(
        f"gateway-traced-{port}", "gateway", "--registry", mesh.registry_url, "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", "0", "--api-key", FULL_KEY,
        env={"OTEL_TRACES_EXPORTER": "console"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    gateway.wait_serving(address)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("authorization", f"Bearer {FULL_KEY}"), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="mlp784")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
        request.raw_input_contents.append(np.zeros(784, dtype=np.float32).tobytes())
        _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=10)
        assert ("meshserve-trace-id", trace_id) in tuple(call.trailing_metadata())
    gateway.stop(timeout=10)
    assert '"name": "gateway ModelInfer"' in gateway.log_path.read_text()


def test_streaming_through_the_gateway(mesh: Mesh) -> None:
    import queue

    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client = triton.InferenceServerClient(mesh.address)
    client.start_stream(lambda result, error: results.put((result, error)), headers=_bearer(FULL_KEY))
    try:
        for index in range(20):
            client.async_stream_infer("digits", [_digits_input(seed=index)[1]], request_id=f"s-{index}")
        client.async_stream_infer("nope", [_digits_input()[1]], request_id="s-missing")
        answers = [results.get(timeout=10) for _ in range(21)]
    finally:
        client.stop_stream()
    ids = {result.get_response().id for result, error in answers if error is None}
    assert ids == {f"s-{index}" for index in range(20)}
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "not served" in str(errors[0])


def test_meshserve_infer_command(mesh: Mesh, tmp_path: Path) -> None:
    random = _meshserve("infer", "digits", "--random", "--url", mesh.address, "--api-key", FULL_KEY)
    assert random.returncode == 0, random.stderr
    assert "model digits version" in random.stdout and "top class:" in random.stdout
    x = np.zeros((2, 784), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(mesh.ca_pem)
    from_file = _meshserve(
        "infer", "mlp784", "--input", str(tmp_path / "x.npy"), "--url", mesh.tls_address, "--api-key", FULL_KEY,
        "--tls-ca", str(ca_file), "--version", "1",
    )  # fmt: skip
    assert from_file.returncode == 0, from_file.stderr
    assert "probabilities FP32 [2, 10]" in from_file.stdout
    refused = _meshserve("infer", "digits", "--random", "--url", mesh.address, "--api-key", "wrong")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr


def _worker_request_counts(mesh: Mesh, model: str) -> list[float]:
    counts = []
    for proc in mesh.group.processes:
        if not proc.name.startswith("worker"):
            continue
        port = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", proc.output()).group(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("meshserve_requests_total{") and f'model="{model}"' in name and 'code="OK"' in name:
                total += float(value)
        counts.append(total)
    return counts


def test_route_policy_consistent_hash_keeps_a_user_on_one_worker(mesh: Mesh) -> None:
    registry_http = mesh.registry_url.replace("consul://", "http://")
    key_url = f"{registry_http}/v1/kv/meshserve/routes/mlp784"
    route = {"weights": {"1": 100}, "policy": "consistent_hash", "hash_header": "x-user"}
    urllib.request.urlopen(urllib.request.Request(key_url, data=json.dumps(route).encode(), method="PUT"), timeout=5)
    client = triton.InferenceServerClient(mesh.address)
    tensor = triton.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 784), dtype=np.float32))
    try:
        time.sleep(1.0)  # applied within a second
        for user in ("alice", "bob", "carol"):
            before = _worker_request_counts(mesh, "mlp784")
            for _ in range(30):
                client.infer("mlp784", [tensor], headers={**_bearer(FULL_KEY), "x-user": user})
            after = _worker_request_counts(mesh, "mlp784")
            deltas = sorted(b - a for a, b in zip(before, after, strict=True))
            assert deltas == [0.0, 30.0], (user, deltas)
    finally:
        urllib.request.urlopen(urllib.request.Request(key_url, method="DELETE"), timeout=5)


# -- meshserve.v1.MeshAdmin on the gateway's port -------------------------------------------------


def test_mesh_admin_lists_workers_and_models_and_sets_routes(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        admin = mesh_pb2_grpc.MeshAdminStub(channel)
        full, digits_only, ops = (_bearer(key).items() for key in (FULL_KEY, DIGITS_KEY, ADMIN_KEY))

        workers = admin.ListWorkers(mesh_pb2.ListWorkersRequest(), metadata=tuple(full), timeout=5).workers
        assert len(workers) == 2
        for worker in workers:
            assert worker.state == "active" and worker.address.startswith("127.0.0.1:")
            assert list(worker.models) == ["digits:1", "digits:2", "mlp784:1"]
            assert worker.meta["grpc_port"] == worker.address.rsplit(":", 1)[1] and worker.meta["device"] == "cpu"
        models = admin.ListModels(mesh_pb2.ListModelsRequest(), metadata=tuple(full), timeout=5).models
        assert [(m.name, list(m.versions), m.workers) for m in models] == [
            ("digits", ["1", "2"], 2),
            ("mlp784", ["1"], 2),
        ]
        with pytest.raises(grpc.RpcError) as refused:
            admin.ListWorkers(mesh_pb2.ListWorkersRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

        # Routes: read by anyone allowed the model, changed only by an admin tenant.
        before = admin.GetRoute(mesh_pb2.GetRouteRequest(model="digits"), metadata=tuple(digits_only), timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            admin.GetRoute(mesh_pb2.GetRouteRequest(model="mlp784"), metadata=tuple(digits_only), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        pin_v2 = mesh_pb2.SetRouteRequest(route=mesh_pb2.Route(model="digits", weights={"2": 100}))
        with pytest.raises(grpc.RpcError) as refused:
            admin.SetRoute(pin_v2, metadata=tuple(full), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "admin: true" in refused.value.details()  # type: ignore[attr-defined]
        unserved = mesh_pb2.SetRouteRequest(route=mesh_pb2.Route(model="digits", weights={"9": 100}))
        with pytest.raises(grpc.RpcError) as refused:
            admin.SetRoute(unserved, metadata=tuple(ops), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        nothing = mesh_pb2.SetRouteRequest(route=mesh_pb2.Route(model="digits", weights={"1": 0}))
        with pytest.raises(grpc.RpcError) as refused:
            admin.SetRoute(nothing, metadata=tuple(ops), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]

        assert dict(admin.SetRoute(pin_v2, metadata=tuple(ops), timeout=5).weights) == {"2": 100}
        wait_until(
            lambda: (
                dict(admin.GetRoute(mesh_pb2.GetRouteRequest(model="digits"), metadata=tuple(full)).weights)
                == {"2": 100}
            ),
            2,
            what="the gateway applying the new route",
        )
        client = triton.InferenceServerClient(mesh.address)
        versions = {
            client.infer("digits", [_digits_input()[1]], headers=_bearer(FULL_KEY)).get_response().model_version
            for _ in range(20)
        }
        assert versions == {"2"}
        # One rollback restores the route from before, as after `meshserve model rollout`.
        rollback = _meshserve("model", "rollback", "digits", "--registry", mesh.registry_url)
        assert rollback.returncode == 0, rollback.stderr
        wait_until(
            lambda: (
                admin.GetRoute(mesh_pb2.GetRouteRequest(model="digits"), metadata=tuple(full)).weights == before.weights
            ),
            2,
            what="the route from before",
        )

        with pytest.raises(grpc.RpcError) as refused:
            admin.DrainWorker(mesh_pb2.DrainWorkerRequest(), metadata=tuple(ops), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        assert "worker's own address" in refused.value.details()  # type: ignore[attr-defined]


def test_mesh_cli_asks_the_gateway(mesh: Mesh) -> None:
    """`meshserve mesh ...`: MeshAdmin with a key, no registry access needed."""
    gateway = ("--url", mesh.address)
    listed = _meshserve("mesh", "workers", *gateway, "--api-key", FULL_KEY)
    assert listed.returncode == 0, listed.stderr
    assert "workers behind" in listed.stdout and listed.stdout.count("active") == 2
    models = _meshserve("mesh", "models", *gateway, "--api-key", FULL_KEY)
    assert "digits: versions 1, 2 on 2 worker(s)" in models.stdout, models.stdout + models.stderr
    route = _meshserve("mesh", "route", "digits", *gateway, "--api-key", FULL_KEY)
    assert route.returncode == 0 and route.stdout.startswith("digits: "), route.stdout + route.stderr
    not_admin = _meshserve("mesh", "route", "digits", "--set", "2=100", *gateway, "--api-key", FULL_KEY)
    assert not_admin.returncode == 1 and not_admin.stderr.startswith("PERMISSION_DENIED: "), not_admin.stderr
    bad = _meshserve("mesh", "route", "digits", "--set", "2:100", *gateway, "--api-key", ADMIN_KEY)
    assert bad.returncode == 2 and "VERSION=WEIGHT" in bad.stderr
    no_key = _meshserve("mesh", "workers", *gateway)
    assert no_key.returncode == 1 and no_key.stderr.startswith("UNAUTHENTICATED: ")
