"""Gateway settings: flags of `meshserve gateway`, each with a `MESHSERVE_<NAME>` variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from meshserve.settings import MeshSettings


class GatewaySettings(MeshSettings):
    registry: str = "consul://127.0.0.1:8500"
    # At start, the longest wait for the first read of the workers and routes before the
    # gateway accepts requests; with the registry unreachable it then serves anyway
    # (health NOT_SERVING, no model found) and catches up when the registry answers.
    registry_first_read_s: float = 10.0
    host: str = "0.0.0.0"
    port: int = 8001
    # Registered in the registry as `meshserve-gateway` (for load balancers in front and Prometheus),
    # at this address or, unset, the bind host (this host's address when that is 0.0.0.0).
    self_register: bool = True
    advertise_address: str | None = None
    metrics_port: int = 8002
    log_level: str = "info"
    # Authentication: an auth file (tenants, hashed keys, JWT) or one API key
    # for everything. Neither: no authentication (logged loudly at start).
    auth_file: Path | None = None
    api_key: str | None = None
    auth_reload_interval_s: float = 0.5
    # Public TLS (both or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # mTLS to workers: CA that signed the workers' certificates, and this
    # gateway's client certificate.
    worker_tls_ca: Path | None = None
    worker_tls_cert: Path | None = None
    worker_tls_key: Path | None = None
    # Gateway processes sharing the port through SO_REUSEPORT.
    processes: int = 1
    # Long-lived ModelStreamInfer streams per worker; requests are multiplexed over them.
    streams_per_worker: int = 2
    # Before each message on a worker stream, the longest wait for requests this
    # gateway is still receiving (only while its event loop has work ready; never
    # on an idle gateway): under load they share one message. 0 turns it off.
    hop_busy_wait_us: int = 2000
    # At light load (under one request in flight on average), the event loop polls
    # instead of sleeping from each request's start until half this window after its
    # answer is expected, and for at least this window, so the worker's answer and the
    # next request are picked up without a thread wake-up. Spins a core meanwhile;
    # 0 turns it off.
    light_load_poll_us: int = 2000
    # On SIGTERM: health NOT_SERVING at once, requests still served for `drain_delay` seconds
    # while load balancers in front (health checks, DNS) stop sending here, then refused as
    # UNAVAILABLE with `meshserve-draining: 1` while the ones in flight finish, within
    # `drain_grace` seconds of the signal.
    drain_delay: float = Field(default=1.0, ge=0, description="seconds to keep serving after NOT_SERVING")
    drain_grace: float = Field(default=10.0, ge=0, description="seconds in-flight requests may take after SIGTERM")
    # Used when the client sets no deadline; the hop always carries one.
    default_timeout_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    # Where routing config lives in the registry's KV store.
    routes_prefix: str = "meshserve/routes/"
