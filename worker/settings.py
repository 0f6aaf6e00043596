"""Worker settings: every field is a `meshserve worker` flag and a `MESHSERVE_<NAME>` variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

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
