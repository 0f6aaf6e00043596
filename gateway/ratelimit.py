"""Token-bucket rate limits per tenant.

Buckets live in one gateway process: N gateway processes (or `--processes N`)
together admit N times a tenant's limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.auth import Tenant


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per request."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def take(self) -> float:
        """0.0 when a token was taken; otherwise the seconds until one will be there."""
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0 - 1e-9:  # float error must not refuse a token that is due
            self._tokens = max(0.0, tokens - 1.0)
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate


class RateLimiter:
    """One bucket per tenant with a limit; tenants without one always pass."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, tenant: Tenant) -> float:
        """0.0 when the request may go; otherwise the seconds the caller should wait."""
        if tenant.rate_limit is None:
            return 0.0
        bucket = self._buckets.get(tenant.name)
        if bucket is None or bucket.rate != tenant.rate_limit:
            burst = tenant.burst if tenant.burst is not None else max(1.0, tenant.rate_limit)
            bucket = self._buckets[tenant.name] = TokenBucket(tenant.rate_limit, burst, self._clock)
        return bucket.take()
