"""Token buckets per tenant."""

from __future__ import annotations

import pytest

from gateway.auth import Tenant
from gateway.ratelimit import RateLimiter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert wait == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    clock.now += 10
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0


def test_limiter_is_per_tenant_and_unlimited_tenants_pass() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    slow = Tenant("slow", rate_limit=2)
    other = Tenant("other", rate_limit=2)
    free = Tenant("free")
    assert [limiter.check(slow) for _ in range(2)] == [0.0, 0.0]
    assert limiter.check(slow) == pytest.approx(0.5)
    assert limiter.check(other) == 0.0
    assert all(limiter.check(free) == 0.0 for _ in range(1000))


def test_admitted_rate_matches_the_limit_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    tenant = Tenant("t", rate_limit=50, burst=1)
    admitted = 0
    for _ in range(10_000):  # 10 s of requests arriving every millisecond
        clock.now += 0.001
        admitted += limiter.check(tenant) == 0.0
    assert 495 <= admitted <= 505


def test_changed_limit_takes_effect() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock)
    assert limiter.check(Tenant("t", rate_limit=1)) == 0.0
    assert limiter.check(Tenant("t", rate_limit=1)) > 0
    assert limiter.check(Tenant("t", rate_limit=100)) == 0.0
