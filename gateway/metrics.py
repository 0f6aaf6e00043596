"""The gateway's Prometheus metrics, one instance per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# From ~50 us (a cached error) to 10 s (a slow model under load).
DURATION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class GatewayMetrics:
    """`meshserve_requests_total{component="gateway",model,code}` and friends.

    Labelled children are cached per (model, code) so recording a request is
    two dict lookups and two increments.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Counter(
            "meshserve_requests_total",
            "Requests answered, by model and gRPC code.",
            ["component", "model", "code"],
            registry=registry,
        )
        self._duration = Histogram(
            "meshserve_request_duration_seconds",
            "Time from request arrival to answer.",
            ["component", "model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.auth_failures = Counter(
            "meshserve_auth_failures_total",
            "Requests refused by authentication or authorization.",
            ["code"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "meshserve_rate_limited_total", "Requests refused by a tenant's rate limit.", ["tenant"], registry=registry
        )
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, model: str, code: str, seconds: float) -> None:
        children = self._children.get((model, code))
        if children is None:
            if len(self._children) > 10_000:  # unknown model names must not grow memory without bound
                model = "_other"
            children = self._children[(model, code)] = (
                self._requests.labels("gateway", model, code),
                self._duration.labels("gateway", model),
            )
        children[0].inc()
        children[1].observe(seconds)
