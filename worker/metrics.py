"""The worker's Prometheus metrics, one instance per process (no module-level metric objects)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# ~50 us to ~10 s: sub-millisecond models and slow CPU batches both land in a bucket.
DURATION_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(slots=True)
class ModelMetrics:
    """The children of the per-model metrics, resolved once so the hot path skips label lookups."""

    batch_size: Histogram
    queue_depth: Gauge
    duration: Histogram
    abandoned_runs: Counter


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "meshserve_requests",
            "Inference requests handled, by model and gRPC code.",
            ["component", "model", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "meshserve_request_duration_seconds",
            "Time from receiving an inference request to its response.",
            ["component", "model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "meshserve_batch_size",
            "Rows per ONNX Runtime run.",
            ["component", "model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "meshserve_queue_depth",
            "Requests waiting for a batch.",
            ["component", "model"],
            registry=self.registry,
        )
        self.abandoned_runs = Counter(
            "meshserve_abandoned_runs",
            "ONNX Runtime runs stopped before their end because every request in the batch was "
            "cancelled (the client gave up or its deadline passed) or the model was unloaded.",
            ["component", "model"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, grpc.StatusCode], Counter] = {}

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(
            batch_size=self.batch_size.labels("worker", model),
            queue_depth=self.queue_depth.labels("worker", model),
            duration=self.duration.labels("worker", model),
            abandoned_runs=self.abandoned_runs.labels("worker", model),
        )

    def count_request(self, model: str, code: grpc.StatusCode) -> None:
        child = self._request_children.get((model, code))
        if child is None:
            child = self.requests.labels("worker", model, code.name)
            self._request_children[(model, code)] = child
        child.inc()
