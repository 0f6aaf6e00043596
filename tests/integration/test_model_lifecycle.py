"""The model lifecycle end to end on real processes: quantize -> validate -> publish -> hot load -> rollout ->
rollback through the gateway; tampered versions refused; hot load and unload under traffic without a failure.

One mesh (registry, two workers watching one repository, a gateway) serves the whole module; each test works on
its own model name so the tests do not depend on each other's routes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from meshserve.modeltools import datasets
from tests.harness import REPO_ROOT, ManagedProcess, ProcessGroup, wait_until

pytestmark = pytest.mark.integration

API_KEY = "lifecycle-test-key"
HEADERS = {"authorization": f"Bearer {API_KEY}"}
DIGITS = datasets.digits()


@dataclass
class Mesh:
    repository: Path
    registry_url: str
    gateway: str
    workers: list[tuple[ManagedProcess, str]]
    group: ProcessGroup

    def advertised(self, model: str) -> list[set[str]]:
        """The versions of `model` that each passing worker advertises in the registry."""
        port = self.registry_url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}/v1/health/service/meshserve-worker?passing"
        with urllib.request.urlopen(url, timeout=2) as reply:
            entries = json.load(reply)
        prefix = f"model={model}:"
        return [{t[len(prefix) :] for t in e["Service"]["Tags"] if t.startswith(prefix)} for e in entries]


@pytest.fixture(scope="module")
def mesh(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    repository = tmp_path_factory.mktemp("lifecycle-repo")
    shutil.copytree(demo_repository / "digits", repository / "digits")
    with ProcessGroup() as group:
        try:
            _, registry_url = group.registry()
            workers = [
                group.worker(repository, "--host", "127.0.0.1", "--watch-interval", "0.2", registry_url=registry_url)
                for _ in range(2)
            ]
            _, address = group.gateway(registry_url, "--api-key", API_KEY)
            built = Mesh(repository, registry_url, address, workers, group)
            with triton.InferenceServerClient(address) as client:
                wait_until(lambda: served_version(client, "digits") == "1", 30, 0.2, "gateway serving digits")
            yield built
        except BaseException:
            print(group.dump_logs())
            raise


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, mesh: Mesh) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(mesh.group.dump_logs())


def infer(client: triton.InferenceServerClient, model: str, x: np.ndarray, version: str = "") -> triton.InferResult:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], model_version=version, headers=HEADERS, client_timeout=10)


def labels(client: triton.InferenceServerClient, model: str, x: np.ndarray, version: str) -> np.ndarray:
    """Top-1 labels for all of `x`, in requests of at most 64 samples (the models' max batch size)."""
    return np.concatenate(
        [infer(client, model, x[i : i + 64], version).as_numpy("label") for i in range(0, len(x), 64)]
    )


def served_version(client: triton.InferenceServerClient, model: str, version: str = "") -> str | None:
    try:
        return infer(client, model, DIGITS.inputs[:1], version).get_response().model_version
    except InferenceServerException:
        return None


def meshserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "meshserve", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check:
        assert done.returncode == 0, f"meshserve {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def wait_advertised(mesh: Mesh, model: str, version: str, present: bool = True) -> None:
    def everywhere() -> bool:
        advertised = mesh.advertised(model)
        return len(advertised) == len(mesh.workers) and all((version in v) == present for v in advertised)

    wait_until(everywhere, 30, 0.1, f"{model}:{version} {'advertised' if present else 'gone'} on every worker")


def test_readme_path_quantize_validate_publish_rollout_rollback(mesh: Mesh, tmp_path: Path) -> None:
    v1 = mesh.repository / "digits" / "1" / "model.onnx"
    candidate = tmp_path / "digits-int8.onnx"
    meshserve("model", "quantize", str(v1), "-o", str(candidate), "--mode", "dynamic")
    validated = meshserve("model", "validate", str(candidate), "--reference", str(v1), "--data", "digits")
    assert "PASS" in validated.stdout
    assert candidate.stat().st_size < v1.stat().st_size
    published = meshserve("model", "publish", str(candidate), "--repository", str(mesh.repository), "--name", "digits")
    assert "version" in published.stdout
    assert (mesh.repository / "digits" / "2" / "manifest.json").is_file()

    wait_advertised(mesh, "digits", "2")  # both workers hot-loaded it without a restart
    with triton.InferenceServerClient(mesh.gateway) as client:
        batch = DIGITS.inputs[:200]
        v1_labels = labels(client, "digits", batch, "1")
        v2_labels = labels(client, "digits", batch, "2")
        assert np.mean(v1_labels == v2_labels) >= 0.99

        rolled = meshserve(
            "model", "rollout", "digits", "--version", "2", "--weight", "10", "--registry", mesh.registry_url
        )
        assert "10%" in rolled.stdout
        # The route applies within a second; then about one request in ten goes to version 2.
        wait_until(lambda: served_version(client, "digits") == "1", 30, 0.05, "canary route applied")
        counts = Counter(served_version(client, "digits") for _ in range(300))
        assert set(counts) <= {"1", "2"}, counts
        assert 5 <= counts["2"] <= 75, counts

        meshserve("model", "rollback", "digits", "--registry", mesh.registry_url)

        def only_v1() -> bool:
            return all(served_version(client, "digits") == "1" for _ in range(40))

        wait_until(only_v1, 30, 0.1, "rollback applied")
        assert Counter(served_version(client, "digits") for _ in range(100)) == {"1": 100}


def test_static_quantized_model_serves_and_a_tampered_version_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    v1 = mesh.repository / "digits" / "1" / "model.onnx"
    static = tmp_path / "static.onnx"
    meshserve("model", "quantize", str(v1), "-o", str(static), "--mode", "static", "--calibration", "digits")
    meshserve("model", "validate", str(static), "--reference", str(v1), "--data", "digits")
    meshserve("model", "publish", str(v1), "--repository", str(mesh.repository), "--name", "digits-q")
    meshserve("model", "publish", str(static), "--repository", str(mesh.repository), "--name", "digits-q")
    wait_advertised(mesh, "digits-q", "2")

    # A copy damaged on its way to this host: published elsewhere, one byte flipped, then moved in whole.
    staging = tmp_path / "elsewhere"
    meshserve("model", "publish", str(static), "--repository", str(staging), "--name", "digits-q")
    damaged = staging / "digits-q" / "1" / "model.onnx"
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 0x01
    damaged.write_bytes(bytes(data))
    os.rename(staging / "digits-q" / "1", mesh.repository / "digits-q" / "3")

    for proc, _ in mesh.workers:
        proc.wait_for_output("digits-q/3/model.onnx does not match manifest.json", timeout=30)
    assert mesh.advertised("digits-q") == [{"1", "2"}, {"1", "2"}]
    for proc, _ in mesh.workers:  # published versions were never seen half-written, only the damaged one failed
        assert "cannot serve model digits-q:1" not in proc.output()
        assert "cannot serve model digits-q:2" not in proc.output()
    with triton.InferenceServerClient(mesh.gateway) as client:
        expected = labels(client, "digits-q", DIGITS.inputs, "1")
        quantized = labels(client, "digits-q", DIGITS.inputs, "2")
        assert np.mean(quantized == expected) >= 0.99
        assert np.mean(quantized == DIGITS.labels) >= 0.95
        with pytest.raises(InferenceServerException) as refused:
            infer(client, "digits-q", DIGITS.inputs[:1], "3")
        assert refused.value.status() == "StatusCode.NOT_FOUND"
        assert served_version(client, "digits-q") == "2"  # the working versions never noticed
    # A worker asked directly says why.
    with triton.InferenceServerClient(mesh.workers[0][1]) as direct:
        with pytest.raises(InferenceServerException) as refused:
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(DIGITS.inputs[:1])
            direct.infer("digits-q", [tensor], model_version="3")
        assert refused.value.status() == "StatusCode.NOT_FOUND"
        assert "does not match manifest.json" in refused.value.message()


def test_hot_load_and_unload_under_traffic_fail_no_request(mesh: Mesh) -> None:
    v1 = mesh.repository / "digits" / "1" / "model.onnx"
    meshserve("model", "publish", str(v1), "--repository", str(mesh.repository), "--name", "digits-hot")
    wait_advertised(mesh, "digits-hot", "1")

    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def traffic(address: str, headers: bool) -> None:
        with triton.InferenceServerClient(address) as client:
            tensor = triton.InferInput("input", [4, 64], "FP32")
            tensor.set_data_from_numpy(DIGITS.inputs[:4])
            while not stop.is_set():
                try:
                    reply = client.infer(
                        "digits-hot", [tensor], headers=HEADERS if headers else None, client_timeout=10
                    )
                    outcome = f"v{reply.get_response().model_version}"
                except InferenceServerException as exc:
                    outcome = f"error {exc.status()}: {exc.message()}"
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=traffic, args=(mesh.gateway, True)) for _ in range(2)]
    threads.append(threading.Thread(target=traffic, args=(mesh.workers[0][1], False)))
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: outcomes.total() >= 20, 30, 0.05, "traffic flowing")
        meshserve("model", "publish", str(v1), "--repository", str(mesh.repository), "--name", "digits-hot")
        wait_advertised(mesh, "digits-hot", "2")
        seen_v2 = outcomes["v2"]
        wait_until(lambda: outcomes["v2"] >= seen_v2 + 20, 30, 0.05, "traffic on the new version")

        shutil.rmtree(mesh.repository / "digits-hot" / "2")
        for proc, _ in mesh.workers:
            proc.wait_for_output("unloaded model digits-hot version 2", timeout=30)
        seen_v1 = outcomes["v1"]
        wait_until(lambda: outcomes["v1"] >= seen_v1 + 20, 30, 0.05, "traffic back on version 1")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    failures = {outcome: n for outcome, n in outcomes.items() if outcome.startswith("error")}
    assert failures == {}, failures
    assert outcomes["v1"] > 0 and outcomes["v2"] > 0
    assert mesh.advertised("digits-hot") == [{"1"}, {"1"}]
    # The workers scanned every 0.2 s while publish ran: none ever tried to load a half-written version.
    for proc, _ in mesh.workers:
        assert "cannot serve model digits-hot" not in proc.output()
