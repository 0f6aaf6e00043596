"""A worker serving TLS with required client certificates (mTLS), reached through a gateway that presents
its client certificate (`--worker-tls-*`); callers without a certificate are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import trustme
from tritonclient.utils import InferenceServerException

from tests.harness import ProcessGroup, free_port, wait_until
from tests.integration.test_worker_registration import passing_workers

pytestmark = pytest.mark.integration

API_KEY = "tls-test-key"


def infer_digits(client: triton.InferenceServerClient, **kwargs: object) -> np.ndarray:
    image = np.zeros((1, 64), dtype=np.float32)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(image)
    return client.infer("digits", [tensor], client_timeout=10, **kwargs).as_numpy("probabilities")


def test_mtls_worker_behind_the_gateway(demo_repository: Path, processes: ProcessGroup, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(tmp_path / "worker.pem")
    server.private_key_pem.write_to_path(tmp_path / "worker.key")
    client = ca.issue_cert("meshserve-gateway")
    client.cert_chain_pems[0].write_to_path(tmp_path / "gateway.pem")
    client.private_key_pem.write_to_path(tmp_path / "gateway.key")

    _, registry_url = processes.registry()
    port = free_port()
    worker = processes.start(
        "worker-tls", "worker", "--model-repository", str(demo_repository), "--host", "127.0.0.1",
        "--port", str(port), "--registry", registry_url, "--tls-cert", str(tmp_path / "worker.pem"),
        "--tls-key", str(tmp_path / "worker.key"), "--tls-client-ca", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    worker.wait_for_output("worker serving on")
    # The registry cannot probe a worker that demands a client certificate: it heartbeats a TTL check.
    wait_until(lambda: len(passing_workers(registry_url)) == 1, 30, what="the TLS worker passing its TTL check")
    check = passing_workers(registry_url)[0]["Checks"]
    assert any(c["CheckID"].startswith("service:") and c["Status"] == "passing" for c in check)

    _, gateway = processes.gateway(
        registry_url, "--api-key", API_KEY, "--worker-tls-ca", str(tmp_path / "ca.pem"),
        "--worker-tls-cert", str(tmp_path / "gateway.pem"), "--worker-tls-key", str(tmp_path / "gateway.key"),
    )  # fmt: skip
    through_gateway = triton.InferenceServerClient(gateway)
    headers = {"authorization": f"Bearer {API_KEY}"}
    wait_until(lambda: through_gateway.is_model_ready("digits", headers=headers), 30, what="digits through the gateway")
    probabilities = infer_digits(through_gateway, headers=headers)
    assert probabilities.shape == (1, 10)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)

    worker_address = f"127.0.0.1:{port}"
    with_certificate = triton.InferenceServerClient(
        worker_address,
        ssl=True,
        root_certificates=str(tmp_path / "ca.pem"),
        private_key=str(tmp_path / "gateway.key"),
        certificate_chain=str(tmp_path / "gateway.pem"),
    )
    np.testing.assert_allclose(infer_digits(with_certificate), probabilities, rtol=1e-5)

    without_certificate = triton.InferenceServerClient(
        worker_address, ssl=True, root_certificates=str(tmp_path / "ca.pem")
    )
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        infer_digits(without_certificate)
    plaintext = triton.InferenceServerClient(worker_address)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        infer_digits(plaintext)
    assert worker.alive()
