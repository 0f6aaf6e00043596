"""Balancer settings (`MESHSERVE_LB_*` variables; the gateway builds them and passes them in)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from meshserve.settings import ENV_PREFIX, MeshSettings

PolicyName = Literal["p2c_ewma", "least_request", "round_robin", "consistent_hash"]


class BalancerSettings(MeshSettings):
    """How the balancer picks, ejects, retries and hedges. Times are in seconds unless named `_ms`."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}LB_", extra="ignore", populate_by_name=True)

    policy: PolicyName = Field("p2c_ewma", description="default policy for models without their own")

    # Load: peak EWMA (Finagle/Linkerd) over attempt latency.
    ewma_decay_s: float = Field(10.0, gt=0, description="how fast a latency peak is forgotten")
    default_latency_ms: float = Field(5.0, gt=0, description="estimate for a new endpoint when no peer has one")
    load_report_ttl_s: float = Field(1.0, ge=0, description="how long a worker's load report counts")
    failure_penalty: float = Field(4.0, ge=1, description="a failed attempt counts as this many times the estimate")
    least_request_choices: int = Field(2, ge=2, description="random candidates compared by least_request")
    unlisted_ttl_s: float = Field(
        60.0,
        ge=0,
        description="how long endpoints stay usable when the registry suddenly lists none of their set (0: never)",
    )
    hash_virtual_nodes: int = Field(100, ge=1, description="ring points per endpoint for consistent_hash")

    # Outlier ejection (Envoy's outlier detection).
    ejection_consecutive_failures: int = Field(5, ge=1)
    ejection_base_s: float = Field(5.0, gt=0, description="first ejection time; multiplied by the ejection count")
    ejection_max_s: float = Field(120.0, gt=0)
    max_ejection_percent: float = Field(50.0, ge=0, le=100)
    ejection_deadline_floor_ms: float = Field(
        100.0, ge=0, description="a DEADLINE_EXCEEDED counts against an endpoint only if it had at least this long"
    )

    # Retries (tenacity) and the retry budget (Finagle's RetryBudget).
    max_attempts: int = Field(3, ge=1, description="attempts per request, the first included")
    backoff_base_ms: float = Field(1.0, ge=0)
    backoff_max_ms: float = Field(20.0, ge=0)
    min_attempt_ms: float = Field(
        2.0, ge=0, description="no retry when less than this (or the model's median latency) is left of the deadline"
    )
    retry_budget_ratio: float = Field(0.2, ge=0, description="retries (and hedges) per request over the window")
    retry_budget_min_per_s: float = Field(10.0, ge=0, description="retries always allowed, per second")
    retry_budget_window_s: float = Field(10.0, gt=0)
    attempt_grace_ms: float = Field(
        50.0, ge=0, description="the balancer cuts an attempt off this long after its deadline"
    )

    # Hedging ("The Tail at Scale"), opt-in per model.
    hedge_min_samples: int = Field(20, ge=1, description="latencies seen before the model's p50/p95 are trusted")
    hedge_default_delay_ms: float = Field(50.0, ge=0, description="hedge delay until then")
    hedge_min_delay_ms: float = Field(1.0, ge=0)
    latency_window: int = Field(512, ge=16, description="recent latencies kept per model for its p95")
