"""Prometheus metrics of the registry client and of the embedded agent (one instance per process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from registry.agent.state import AgentState


class RegistryMetrics:
    """Client side: whether watches are stale, how often registry calls fail."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stale = Gauge(
            "meshserve_registry_stale",
            "1 while a watch serves its last known data because the registry is unreachable",
            ["watch"],
            registry=registry,
        )
        self.errors = Counter(
            "meshserve_registry_errors_total",
            "Registry calls that failed (connection errors, timeouts, error answers)",
            ["operation"],
            registry=registry,
        )
        self.updates = Counter(
            "meshserve_registry_watch_updates_total",
            "Changes a watch delivered",
            ["watch"],
            registry=registry,
        )


class AgentMetrics:
    """The embedded agent: what it holds."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.services = Gauge("meshserve_registry_services", "Services registered on the agent", registry=registry)
        self.checks = Gauge("meshserve_registry_checks", "Checks on the agent by status", ["status"], registry=registry)
        self.kv_keys = Gauge("meshserve_registry_kv_keys", "Keys in the agent's KV store", registry=registry)
        self.index = Gauge("meshserve_registry_index", "The agent's current raft-like index", registry=registry)

    def observe(self, state: AgentState) -> None:
        self.services.set(len(state.services))
        for status in ("passing", "warning", "critical"):
            self.checks.labels(status).set(sum(1 for c in state.checks.values() if c.status == status))
        self.kv_keys.set(len(state.kv))
        self.index.set(state.index)
