"""Worker settings: every field is a `meshserve worker` flag and a `MESHSERVE_<NAME>` variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from meshserve.settings import MeshSettings


class WorkerSettings(MeshSettings):
    model_repository: Path
    registry: str | None = Field(default=None, description="consul://HOST:PORT; serve unregistered when unset")
    host: str = "0.0.0.0"
    port: int = Field(default=0, ge=0, le=65535)
    advertise_address: str | None = Field(default=None, description="address registered in the registry")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/metrics port; 0 picks a free port")
    log_level: str = "info"
    max_message_size: int = Field(default=64 * 1024 * 1024, gt=0, description="bytes, both directions")
    drain_grace: float = Field(default=30.0, ge=0, description="seconds in-flight work may take after SIGTERM")
    drain_delay: float = Field(
        default=1.0, ge=0, description="seconds to keep serving after NOT_SERVING / deregistering"
    )
    watch_interval: float = Field(
        default=1.0, ge=0, description="seconds between scans for new/removed model versions; 0 turns hot loading off"
    )
    unload_drain: float = Field(
        default=2.0, ge=0, description="seconds a removed version keeps answering after leaving the registry tags"
    )
    inject_latency_ms: float = Field(default=0.0, ge=0, description="test aid: fixed delay added to every request")
    # TLS on the gRPC port (both or neither); with a client CA, callers must present a
    # certificate it signed (mTLS: the gateway's --worker-tls-cert/--worker-tls-key).
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain served on the gRPC port")
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(default=None, description="PEM CA that must have signed callers' certificates")

    @model_validator(mode="after")
    def _tls_complete(self) -> WorkerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS with client certificates")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
