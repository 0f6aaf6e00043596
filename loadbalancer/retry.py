"""Retry policy for tenacity, and the retry budget that keeps an outage from multiplying load.

A failed attempt is retried (on a different endpoint: the balancer excludes
the ones tried) only when it is retryable (`errors.classify`), another
attempt is allowed, the remaining deadline fits one more attempt after the
jittered backoff, an untried usable endpoint exists, and the budget has a
token. When retries stop for any of these reasons, the request fails with
`NoEndpointAvailable` saying which reason and what the last error was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from loadbalancer.errors import NoEndpointAvailable, classify, is_retryable

if TYPE_CHECKING:
    from loadbalancer.settings import BalancerSettings


class RetryBudget:
    """Finagle's retry budget: retries <= ratio x requests + min_per_s x window, over a sliding window.

    The window is a ring of buckets, so deposits and withdrawals are O(1).
    """

    _BUCKETS = 10

    def __init__(self, ratio: float, min_per_s: float, window_s: float, clock: Callable[[], float]) -> None:
        self._ratio = ratio
        self._reserve = min_per_s * window_s
        self._width = window_s / self._BUCKETS
        self._clock = clock
        self._requests = [0] * self._BUCKETS
        self._retries = [0] * self._BUCKETS
        self._total_requests = 0
        self._total_retries = 0
        self._tick = int(clock() / self._width)

    def _advance(self) -> int:
        tick = int(self._clock() / self._width)
        # Buckets that the window slid past start empty again.
        for stale in range(self._tick + 1, min(tick, self._tick + self._BUCKETS) + 1):
            slot = stale % self._BUCKETS
            self._total_requests -= self._requests[slot]
            self._total_retries -= self._retries[slot]
            self._requests[slot] = self._retries[slot] = 0
        self._tick = max(tick, self._tick)
        return self._tick % self._BUCKETS

    def deposit(self) -> None:
        """One request arrived."""
        slot = self._advance()
        self._requests[slot] += 1
        self._total_requests += 1

    def available(self) -> float:
        self._advance()
        return self._ratio * self._total_requests + self._reserve - self._total_retries

    def try_withdraw(self) -> bool:
        """Takes one retry (or hedge) from the budget; False when it is spent."""
        slot = self._advance()
        if self._ratio * self._total_requests + self._reserve - self._total_retries < 1.0:
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True


class RetryGate:
    """One request's tenacity stop condition: it records why retrying stopped."""

    def __init__(
        self,
        *,
        model: str,
        version: str,
        max_attempts: int,
        deadline: float | None,
        min_attempt_s: float,
        clock: Callable[[], float],
        has_untried: Callable[[], bool],
        budget: RetryBudget,
        on_budget_exhausted: Callable[[], None],
    ) -> None:
        self.model = model
        self.version = version
        self._max_attempts = max_attempts
        self._deadline = deadline
        self._min_attempt_s = min_attempt_s
        self._clock = clock
        self._has_untried = has_untried
        self._budget = budget
        self._on_budget_exhausted = on_budget_exhausted
        self.reason = ""

    def stop(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self._max_attempts:
            self.reason = f"{state.attempt_number} attempts failed"
        elif self._deadline is not None and (
            self._deadline - self._clock() - state.upcoming_sleep < self._min_attempt_s
        ):
            self.reason = f"deadline too short for another attempt after {state.attempt_number}"
        elif not self._has_untried():
            self.reason = f"no other usable endpoint after {state.attempt_number} attempts"
        elif not self._budget.try_withdraw():
            self._on_budget_exhausted()
            self.reason = "retry budget exhausted"
        else:
            return False
        return True

    def give_up(self, state: RetryCallState) -> None:
        assert state.outcome is not None  # tenacity only gives up after an attempt
        error = state.outcome.exception()
        assert error is not None  # only failures are retried
        raise NoEndpointAvailable(
            self.model, self.version, f"{self.reason}; last error: {classify(error).describe()}"
        ) from error


def retrying(
    settings: BalancerSettings, gate: RetryGate, before_sleep: Callable[[RetryCallState], None]
) -> AsyncRetrying:
    """The tenacity controller for one request."""
    return AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        stop=gate.stop,
        wait=wait_random_exponential(
            multiplier=settings.backoff_base_ms / 1000.0, max=settings.backoff_max_ms / 1000.0
        ),
        before_sleep=before_sleep,
        retry_error_callback=gate.give_up,
    )
