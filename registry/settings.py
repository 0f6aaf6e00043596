"""Settings of the registry client and of the embedded agent (`MESHSERVE_*` variables)."""

from __future__ import annotations

from pydantic import Field

from meshserve.settings import MeshSettings


class RegistrySettings(MeshSettings):
    """How the client side talks to Consul (or the embedded agent)."""

    # Blocking queries are held this long by the agent when nothing changes (Consul's default is 5m).
    registry_watch_wait_s: float = Field(60.0, gt=0, le=600)
    # Capped exponential backoff between failed or instantly-repeated queries.
    registry_backoff_initial_s: float = Field(0.1, gt=0)
    registry_backoff_max_s: float = Field(2.0, gt=0)
    # Non-blocking calls (register, heartbeat, KV writes) give up after this long.
    registry_request_timeout_s: float = Field(5.0, gt=0)
    # How often a registered worker checks the agent still knows it (re-registers if not).
    registry_resync_interval_s: float = Field(1.0, gt=0)


class AgentSettings(MeshSettings):
    """The embedded agent (`meshserve registry`)."""

    registry_host: str = "127.0.0.1"
    registry_port: int = Field(8500, ge=0, le=65535)
    # How often TTL expiry and DeregisterCriticalServiceAfter are evaluated.
    registry_sweep_interval_s: float = Field(0.1, gt=0)
    # Consul never runs interval checks more often than once a second.
    registry_min_check_interval_s: float = Field(1.0, gt=0)
    node_name: str | None = None
    datacenter: str = "dc1"
    metrics_port: int | None = None
    log_level: str = "info"
