"""The balancer's Prometheus metrics, one instance per process with its own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# (model, state) -> number of endpoints; read at scrape time so states that
# change by the clock alone (an ejection running out) are never stale.
EndpointCounts = Callable[[], Iterable[tuple[str, str, int]]]


class _EndpointsCollector(Collector):
    def __init__(self) -> None:
        self.sources: list[EndpointCounts] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meshserve_endpoints", "Endpoints known to the balancer, by model and state", labels=["model", "state"]
        )
        for source in self.sources:
            for model, state, count in source():
                family.add_metric([model, state], count)
        yield family


class BalancerMetrics:
    """`meshserve_retries_total{model,reason}`, `meshserve_ejections_total{model}`,
    `meshserve_endpoints{model,state}` (and `meshserve_retry_budget_exhausted_total{model}`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retries = Counter(
            "meshserve_retries",
            "Extra attempts the balancer made (retries and hedges), by model and reason",
            ["model", "reason"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "meshserve_ejections",
            "Outlier ejections of an endpoint serving the model",
            ["model"],
            registry=self.registry,
        )
        self.budget_exhausted = Counter(
            "meshserve_retry_budget_exhausted",
            "Retries or hedges refused because the retry budget was spent",
            ["model"],
            registry=self.registry,
        )
        self._endpoints = _EndpointsCollector()
        self.registry.register(self._endpoints)

    def watch_endpoints(self, source: EndpointCounts) -> None:
        """Reports `source()`'s counts as `meshserve_endpoints` at every scrape."""
        self._endpoints.sources.append(source)
