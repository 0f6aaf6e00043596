"""WorkerSettings: TLS flags must come as a usable set, with a message that says what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import WorkerSettings


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--tls-cert and --tls-key go together"):
        WorkerSettings(model_repository=tmp_path, tls_cert=tmp_path / "cert.pem")


def test_a_client_ca_needs_a_server_certificate(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--tls-client-ca needs --tls-cert"):
        WorkerSettings(model_repository=tmp_path, tls_client_ca=tmp_path / "ca.pem")


def test_tls_is_off_by_default_and_on_with_a_certificate(tmp_path: Path) -> None:
    assert not WorkerSettings(model_repository=tmp_path).tls
    on = WorkerSettings(model_repository=tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    assert on.tls
