"""The balancer: endpoint sets + a policy per model + ejection + tenacity retries + hedging.

`Balancer.call` picks an endpoint serving the model version, runs the caller's
attempt function on it with the remaining deadline, and fails over to a
different endpoint when the failure is retryable (see `loadbalancer.retry`).
Every attempt is one `AttemptEvent` and, when tracing is on, one `balancer.attempt` span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from tenacity import RetryCallState

from loadbalancer.discovery import EndpointSet, EndpointSets
from loadbalancer.ejection import OutlierDetector
from loadbalancer.endpoint import Connection, Endpoint, EndpointState
from loadbalancer.errors import AttemptFailed, Failure, NoEndpointAvailable, classify, is_retryable
from loadbalancer.hedging import LatencyTracker, hedged
from loadbalancer.load import EndpointLoad
from loadbalancer.metrics import BalancerMetrics
from loadbalancer.policies import Policy, build_policy
from loadbalancer.retry import RetryBudget, RetryGate, retrying
from loadbalancer.settings import BalancerSettings, PolicyName
from meshserve.telemetry import tracing_enabled

if TYPE_CHECKING:
    from registry.model import EndpointChange, ServiceInstance

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What an attempt runs in when tracing is off; nullcontext objects are reusable.
_NO_SPAN: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)
AttemptFn = Callable[[Endpoint, float | None], Awaitable[T]]


@dataclass(frozen=True)
class ModelPolicy:
    """How one model is balanced: the policy, the header that keys consistent_hash, hedging on/off."""

    policy: PolicyName = "p2c_ewma"
    hash_header: str | None = None
    hedge: bool = False


@dataclass(frozen=True)
class AttemptEvent:
    """One finished attempt, as the `on_attempt` hook sees it."""

    model: str
    version: str
    endpoint: Endpoint
    policy: str
    attempt: int
    outcome: str  # "ok", "cancelled", "draining", "connection_error" or the status code in lower case
    hedge: bool
    duration_s: float


class AttemptObserver(Protocol):
    def __call__(self, event: AttemptEvent) -> None: ...


class _Request(Generic[T]):
    """One call's state across its attempts."""

    __slots__ = ("attempt_fn", "attempts", "deadline", "hash_key", "model", "policy", "tried", "version")

    def __init__(
        self,
        model: str,
        version: str,
        attempt_fn: AttemptFn[T],
        deadline: float | None,
        hash_key: str | None,
        policy: Policy,
    ) -> None:
        self.model = model
        self.version = version
        self.attempt_fn = attempt_fn
        self.deadline = deadline
        self.hash_key = hash_key
        self.policy = policy
        self.tried: set[str] = set()
        self.attempts = 0


class Balancer:
    """Client-side balancing for one process (the gateway): see the module docstring and docs/internals.md."""

    def __init__(
        self,
        settings: BalancerSettings,
        connector: Callable[[ServiceInstance], Connection],
        *,
        metrics: BalancerMetrics | None = None,
        on_attempt: AttemptObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else BalancerMetrics()
        self._on_attempt = on_attempt
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._sets = EndpointSets(
            connector,
            lambda initial_s: EndpointLoad(initial_s, settings.ewma_decay_s, settings.load_report_ttl_s, clock),
            settings.default_latency_ms / 1000.0,
            clock,
            settings.unlisted_ttl_s,
        )
        self._policies: dict[str, Policy] = {}
        self._model_policies: dict[str, ModelPolicy] = {}
        self._default_policy = ModelPolicy(policy=settings.policy)
        self._latencies: dict[str, LatencyTracker] = {}
        self._budget = RetryBudget(
            settings.retry_budget_ratio, settings.retry_budget_min_per_s, settings.retry_budget_window_s, clock
        )
        self._outliers = OutlierDetector(
            consecutive_failures=settings.ejection_consecutive_failures,
            base_s=settings.ejection_base_s,
            max_s=settings.ejection_max_s,
            max_percent=settings.max_ejection_percent,
            deadline_floor_s=settings.ejection_deadline_floor_ms / 1000.0,
            clock=clock,
        )
        # None when tracing is off: an attempt then makes no span at all (a no-op one costs ~5 us).
        self._tracer: trace.Tracer | None = trace.get_tracer("meshserve.loadbalancer") if tracing_enabled() else None
        self._closed = False
        self.metrics.watch_endpoints(self._sets.state_counts)

    # -- configuration and registry events ---------------------------------

    def apply(self, changes: Iterable[EndpointChange]) -> None:
        """Applies registry events: added endpoints are usable at once; removed ones close when idle."""
        self._sets.apply(changes)

    def set_model_policy(self, model: str, policy: ModelPolicy) -> None:
        self._policy(policy.policy)  # unknown names fail here, not on the first request
        self._model_policies[model] = policy

    def model_policy(self, model: str) -> ModelPolicy:
        return self._model_policies.get(model, self._default_policy)

    def _policy(self, name: str) -> Policy:
        policy = self._policies.get(name)
        if policy is None:
            policy = build_policy(
                name,
                least_request_choices=self.settings.least_request_choices,
                virtual_nodes=self.settings.hash_virtual_nodes,
                rng=self._rng,
            )
            self._policies[name] = policy
        return policy

    # -- views ---------------------------------------------------------------

    def versions(self, model: str) -> set[str]:
        """Versions of `model` with at least one endpoint (in any state but removed)."""
        return {version for (name, version), members in self._sets.sets.items() if name == model and members}

    def endpoints(self, model: str | None = None, version: str | None = None) -> list[Endpoint]:
        return list(self._sets.iter_endpoints(model, version))

    # -- the request path ------------------------------------------------------

    async def call(
        self,
        model: str,
        version: str,
        attempt: AttemptFn[T],
        *,
        timeout: float | None,  # noqa: ASYNC109 - the caller's deadline, propagated to each attempt
        hash_key: str | None = None,
    ) -> T:
        """Runs `attempt(endpoint, remaining_timeout_s)` until one succeeds or retrying stops.

        Non-retryable errors propagate unchanged; when retryable failures run out
        of attempts, deadline, endpoints or budget, `NoEndpointAvailable` is raised
        (chained to the last failure).
        """
        if self._closed:
            raise NoEndpointAvailable(model, version, "the balancer is shut down")
        if self._sets.unlisted:
            self._sets.expire_unlisted()
        if (model, version) not in self._sets.sets:
            raise NoEndpointAvailable(model, version, f"no passing worker serves {model}:{version}")
        deadline = None if timeout is None else self._clock() + timeout
        self._budget.deposit()
        model_policy = self.model_policy(model)
        request: _Request[T] = _Request(model, version, attempt, deadline, hash_key, self._policy(model_policy.policy))
        one_attempt = self._hedged_attempt if model_policy.hedge else self._single_attempt
        try:
            # The first attempt runs outside tenacity: most calls succeed at once, and
            # tenacity's per-attempt bookkeeping costs more than the pick itself.
            return await one_attempt(request)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            first_failure = exc
        gate = RetryGate(
            model=model,
            version=version,
            max_attempts=self.settings.max_attempts,
            deadline=deadline,
            # Another attempt must have a fair chance: at least the model's typical latency.
            min_attempt_s=max(self.settings.min_attempt_ms / 1000.0, self._latency(model).p50() or 0.0),
            clock=self._clock,
            has_untried=lambda: self._pick(request) is not None,
            budget=self._budget,
            on_budget_exhausted=lambda: self.metrics.budget_exhausted.labels(model).inc(),
        )
        replayed = False

        async def attempts(request: _Request[T]) -> T:
            # Tenacity's first "attempt" hands it the failure that already happened,
            # so its retry/stop/wait decisions see every real attempt in order.
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first_failure
            return await one_attempt(request)

        controller = retrying(self.settings, gate, lambda state: self._count_retry(request, state))
        return await controller(attempts, request)

    def _count_retry(self, request: _Request[T], state: RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        reason = classify(error).outcome if error is not None else "unknown"
        self.metrics.retries.labels(request.model, reason).inc()

    def _pick(self, request: _Request[T]) -> Endpoint | None:
        endpoint_set = self._sets.sets.get((request.model, request.version))
        if endpoint_set is None:
            return None
        return request.policy.pick(endpoint_set, request.tried, self._clock(), request.hash_key)

    def _pick_or_raise(self, request: _Request[T]) -> Endpoint:
        endpoint = self._pick(request)
        if endpoint is None:
            raise NoEndpointAvailable(request.model, request.version, self._why_none(request))
        return endpoint

    def _why_none(self, request: _Request[T]) -> str:
        endpoint_set = self._sets.sets.get((request.model, request.version))
        if endpoint_set is None:
            return f"no passing worker serves {request.model}:{request.version}"
        states = [endpoint.state for endpoint in endpoint_set.members]
        total = len(states)
        ejected = states.count(EndpointState.EJECTED)
        draining = states.count(EndpointState.DRAINING)
        if ejected == total:
            return f"all {total} endpoints ejected"
        if draining == total:
            return f"all {total} endpoints draining"
        tried = sum(1 for endpoint in endpoint_set.members if endpoint.id in request.tried)
        return f"no untried endpoint left ({total} endpoints: {tried} tried, {ejected} ejected, {draining} draining)"

    async def _single_attempt(self, request: _Request[T]) -> T:
        request.attempts += 1
        return await self._run(request, self._pick_or_raise(request), request.attempts, hedge=False)

    async def _hedged_attempt(self, request: _Request[T]) -> T:
        request.attempts += 1
        number = request.attempts
        first = self._pick_or_raise(request)
        request.tried.add(first.id)  # before the hedge picks, whenever the first attempt starts running

        def start_hedge() -> Awaitable[T] | None:
            second = self._pick(request)
            if second is None:
                return None
            if not self._budget.try_withdraw():
                self.metrics.budget_exhausted.labels(request.model).inc()
                return None
            self.metrics.retries.labels(request.model, "hedge").inc()
            return self._run(request, second, number, hedge=True)

        return await hedged(self._run(request, first, number, hedge=False), self._hedge_delay(request), start_hedge)

    def _hedge_delay(self, request: _Request[T]) -> float:
        p95 = self._latency(request.model).p95()
        delay = self.settings.hedge_default_delay_ms / 1000.0 if p95 is None else p95
        if request.deadline is not None:
            delay = min(delay, max(request.deadline - self._clock(), 0.0))
        return max(delay, self.settings.hedge_min_delay_ms / 1000.0)

    def _latency(self, model: str) -> LatencyTracker:
        tracker = self._latencies.get(model)
        if tracker is None:
            tracker = LatencyTracker(self.settings.latency_window, self.settings.hedge_min_samples)
            self._latencies[model] = tracker
        return tracker

    async def _run(self, request: _Request[T], endpoint: Endpoint, number: int, *, hedge: bool) -> T:
        """One attempt on one endpoint: deadline, load accounting, ejection, span and event."""
        request.tried.add(endpoint.id)
        start = self._clock()
        remaining = None if request.deadline is None else request.deadline - start
        outcome = "ok"
        endpoint.load.pending += 1
        with self._attempt_span(request, endpoint, number, hedge) as span:
            try:
                result = await self._bounded(request, endpoint, remaining)
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except Exception as exc:
                failure = classify(exc)
                outcome = failure.outcome
                span.set_status(Status(StatusCode.ERROR, failure.describe()))
                self._failed(request, endpoint, failure, self._clock() - start, remaining)
                raise
            else:
                self._succeeded(request, endpoint, self._clock() - start)
                return result
            finally:
                endpoint.load.pending -= 1
                span.set_attribute("meshserve.outcome", outcome)
                self._sets.release(endpoint)
                self._notify(request, endpoint, number, outcome, hedge, self._clock() - start)

    def _attempt_span(
        self, request: _Request[T], endpoint: Endpoint, number: int, hedge: bool
    ) -> AbstractContextManager[trace.Span]:
        if self._tracer is None:
            return _NO_SPAN
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            # An unsampled request: no built-in sampler records a child of it (parent-based ones follow
            # the flag, a trace-id ratio decides the same way for the same trace), so skip the span.
            return _NO_SPAN
        return self._tracer.start_as_current_span(
            "balancer.attempt",
            attributes={
                "meshserve.endpoint": endpoint.target,
                "meshserve.policy": request.policy.name,
                "meshserve.attempt": number,
                "meshserve.hedge": hedge,
                "meshserve.model": request.model,
                "meshserve.model_version": request.version,
            },
            record_exception=False,
            set_status_on_exception=False,
        )

    async def _bounded(self, request: _Request[T], endpoint: Endpoint, remaining: float | None) -> T:
        """The attempt, cut off shortly after the caller's deadline in case it does not enforce it."""
        if remaining is None:
            return await request.attempt_fn(endpoint, None)
        if remaining <= 0:
            raise AttemptFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the attempt started")
        try:
            async with asyncio.timeout(remaining + self.settings.attempt_grace_ms / 1000.0):
                return await request.attempt_fn(endpoint, remaining)
        except TimeoutError as exc:
            raise AttemptFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded waiting for {endpoint.target}"
            ) from exc

    def _succeeded(self, request: _Request[T], endpoint: Endpoint, elapsed: float) -> None:
        endpoint.load.ewma.observe(elapsed)
        self._outliers.success(endpoint)
        self._latency(request.model).record(elapsed)

    def _failed(
        self, request: _Request[T], endpoint: Endpoint, failure: Failure, elapsed: float, allotted: float | None
    ) -> None:
        if failure.draining:
            endpoint.draining = True  # out of rotation until the registry removes or re-announces it
            return
        if self._outliers.counts_against(failure, allotted):
            # A failing endpoint must not look fast: fast failures would attract traffic.
            ewma = endpoint.load.ewma
            ewma.observe(max(elapsed, ewma.current() * self.settings.failure_penalty))
            if self._outliers.failure(endpoint, self._sets.sets_of(endpoint)):
                for model in {endpoint_set.model for endpoint_set in self._sets.sets_of(endpoint)}:
                    self.metrics.ejections.labels(model).inc()
        elif failure.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            # The worker answered (e.g. INVALID_ARGUMENT): it is healthy and that was its latency.
            endpoint.load.ewma.observe(elapsed)
            self._outliers.success(endpoint)

    def _notify(
        self, request: _Request[T], endpoint: Endpoint, number: int, outcome: str, hedge: bool, took: float
    ) -> None:
        if self._on_attempt is None:
            return
        event = AttemptEvent(
            request.model, request.version, endpoint, request.policy.name, number, outcome, hedge, took
        )
        try:
            self._on_attempt(event)
        except Exception:
            logger.exception("the on_attempt hook failed")

    async def close(self) -> None:
        """Stops taking calls and closes every connection once its in-flight calls finish."""
        self._closed = True
        await self._sets.close_all()


__all__ = [
    "AttemptEvent",
    "AttemptObserver",
    "Balancer",
    "Connection",
    "Endpoint",
    "EndpointSet",
    "ModelPolicy",
]
