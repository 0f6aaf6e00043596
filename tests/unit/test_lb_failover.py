"""Retries, the retry budget, deadlines, outlier ejection, hedging and what the balancer reports."""

from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from loadbalancer.balancer import AttemptEvent, Balancer, ModelPolicy
from loadbalancer.endpoint import Endpoint, EndpointState
from loadbalancer.errors import AttemptFailed, NoEndpointAvailable
from loadbalancer.metrics import BalancerMetrics
from loadbalancer.settings import BalancerSettings
from registry.model import EndpointChange, ServiceInstance, model_tag


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SimConnection:
    async def close(self) -> None:
        pass


def instance(n: int) -> ServiceInstance:
    return ServiceInstance(id=f"w{n}", address="127.0.0.1", port=50000 + n, tags=(model_tag("digits", 1),))


def rpc_error(code: grpc.StatusCode, details: str = "simulated", trailing: tuple = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


def make_balancer(
    count: int, *, clock: FakeClock | None = None, events: list[AttemptEvent] | None = None, **settings: object
) -> Balancer:
    lb = Balancer(
        BalancerSettings(**settings),
        lambda _inst: SimConnection(),
        metrics=BalancerMetrics(CollectorRegistry()),
        on_attempt=events.append if events is not None else None,
        rng=random.Random(11),
        **({"clock": clock} if clock else {}),
    )
    lb.apply([EndpointChange("added", instance(n)) for n in range(count)])
    return lb


def sample(lb: Balancer, name: str, **labels: str) -> float:
    return lb.metrics.registry.get_sample_value(name, labels) or 0.0


class Script:
    """An attempt function whose endpoints fail as told; records which endpoint each attempt went to."""

    def __init__(self, failing: dict[str, BaseException]) -> None:
        self.failing = failing
        self.tried: list[str] = []
        self.remaining: list[float | None] = []

    async def __call__(self, endpoint: Endpoint, remaining: float | None) -> str:
        self.tried.append(endpoint.id)
        self.remaining.append(remaining)
        if endpoint.id in self.failing:
            raise self.failing[endpoint.id]
        return endpoint.id


async def test_unavailable_fails_over_to_a_different_endpoint() -> None:
    events: list[AttemptEvent] = []
    lb = make_balancer(3, events=events, backoff_base_ms=0)
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    script = Script({"w0": down, "w1": down})
    assert await lb.call("digits", "1", script, timeout=5) == "w2"
    for _ in range(20):
        script.tried.clear()
        assert await lb.call("digits", "1", script, timeout=5) == "w2"
        assert len(script.tried) == len(set(script.tried))  # never the same endpoint twice
    assert sample(lb, "meshserve_retries_total", model="digits", reason="unavailable") > 0
    assert {e.outcome for e in events} == {"unavailable", "ok"}
    assert all(e.policy == "p2c_ewma" and not e.hedge for e in events)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
async def test_non_retryable_codes_pass_straight_through(code: grpc.StatusCode) -> None:
    lb = make_balancer(3)
    error = rpc_error(code, "input__0: expected FP32, got INT64")
    script = Script({f"w{n}": error for n in range(3)})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await lb.call("digits", "1", script, timeout=5)
    assert raised.value is error
    assert len(script.tried) == 1

    reported = AttemptFailed(code, "from a stream response")
    script = Script({f"w{n}": reported for n in range(3)})
    with pytest.raises(AttemptFailed) as raised_failed:
        await lb.call("digits", "1", script, timeout=5)
    assert raised_failed.value is reported and len(script.tried) == 1


async def test_a_draining_worker_is_retried_elsewhere_and_leaves_rotation() -> None:
    lb = make_balancer(2, backoff_base_ms=0)
    draining = rpc_error(grpc.StatusCode.UNAVAILABLE, "worker is draining", trailing=(("meshserve-draining", "1"),))
    script = Script({"w0": draining, "w1": AttemptFailed(grpc.StatusCode.UNAVAILABLE, "bye", draining=True)})
    with pytest.raises(NoEndpointAvailable, match="no other usable endpoint"):
        await lb.call("digits", "1", script, timeout=5)
    assert {e.state for e in lb.endpoints("digits")} == {EndpointState.DRAINING}
    with pytest.raises(NoEndpointAvailable, match="all 2 endpoints draining"):
        await lb.call("digits", "1", script, timeout=5)
    # Announced again by the registry (e.g. back from maintenance): in rotation again.
    lb.apply([EndpointChange("updated", instance(1))])
    assert await lb.call("digits", "1", Script({}), timeout=5) == "w1"


async def test_connection_errors_are_retried() -> None:
    lb = make_balancer(2, backoff_base_ms=0)
    script = Script({"w0": ConnectionResetError("peer went away")})
    for _ in range(10):
        assert await lb.call("digits", "1", script, timeout=5) == "w1"


async def test_unknown_model_says_which_and_why() -> None:
    lb = make_balancer(1)
    with pytest.raises(NoEndpointAvailable, match=r"no passing worker serves digits:2") as raised:
        await lb.call("digits", "2", Script({}), timeout=1)
    assert (raised.value.model, raised.value.version) == ("digits", "2")


async def test_retries_stop_after_max_attempts_with_the_last_error() -> None:
    lb = make_balancer(5, backoff_base_ms=0, max_attempts=3)
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    script = Script({f"w{n}": down for n in range(5)})
    with pytest.raises(
        NoEndpointAvailable, match="3 attempts failed; last error: UNAVAILABLE: connection refused"
    ) as e:
        await lb.call("digits", "1", script, timeout=5)
    assert e.value.__cause__ is down
    assert len(set(script.tried)) == 3


async def test_budget_exhaustion_stops_retries() -> None:
    lb = make_balancer(3, backoff_base_ms=0, retry_budget_ratio=0.2, retry_budget_min_per_s=0, max_attempts=3)
    down = rpc_error(grpc.StatusCode.UNAVAILABLE)
    script = Script({f"w{n}": down for n in range(3)})
    reasons: list[str] = []
    for _ in range(50):
        with pytest.raises(NoEndpointAvailable) as raised:
            await lb.call("digits", "1", script, timeout=5)
        reasons.append(raised.value.reason)
    # 50 requests buy 10 retries: the outage costs 1.2x the load, not 3x.
    assert len(script.tried) <= 50 + 0.2 * 50
    assert sum("retry budget exhausted" in reason for reason in reasons) >= 40
    assert sample(lb, "meshserve_retry_budget_exhausted_total", model="digits") >= 40


async def test_budget_has_a_floor_per_second() -> None:
    clock = FakeClock()
    lb = make_balancer(
        3,
        clock=clock,
        policy="round_robin",
        ejection_consecutive_failures=1000,
        backoff_base_ms=0,
        retry_budget_ratio=0,
        retry_budget_min_per_s=1,
        retry_budget_window_s=10,
    )
    script = Script({"w0": rpc_error(grpc.StatusCode.UNAVAILABLE), "w1": rpc_error(grpc.StatusCode.UNAVAILABLE)})
    results = []
    for _ in range(40):
        try:
            results.append(await lb.call("digits", "1", script, timeout=5))
        except NoEndpointAvailable as exc:
            results.append(exc.reason)
    assert results.count("w2") >= 1
    assert any("retry budget exhausted" in str(r) for r in results)
    assert len(script.tried) - 40 == 10  # the floor: 1/s over a 10 s window
    clock.now += 10  # the window slides: the floor is there again
    script.tried.clear()
    for _ in range(3):
        with contextlib.suppress(NoEndpointAvailable):
            await lb.call("digits", "1", script, timeout=5)
    assert len(script.tried) > 3


async def test_deadline_stops_retries_and_every_attempt_gets_the_remaining_deadline() -> None:
    lb = make_balancer(3, backoff_base_ms=0, min_attempt_ms=40)

    async def slow_failure(endpoint: Endpoint, remaining: float | None) -> str:
        seen.append(remaining)
        await asyncio.sleep(0.05)
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "overloaded")

    seen: list[float | None] = []
    with pytest.raises(NoEndpointAvailable, match="deadline too short for another attempt"):
        await lb.call("digits", "1", slow_failure, timeout=0.12)
    assert len(seen) == 2  # 0.12 s fits two 50 ms attempts, then 20 ms are left: under the 40 ms minimum
    assert seen[0] is not None and seen[1] is not None
    assert 0.10 < seen[0] <= 0.12 and seen[1] < seen[0] - 0.04


async def test_no_retry_when_the_deadline_left_is_below_the_models_typical_latency() -> None:
    lb = make_balancer(3, backoff_base_ms=0, min_attempt_ms=0, hedge_min_samples=20)

    async def takes_30ms(endpoint: Endpoint, _remaining: float | None) -> str:
        await asyncio.sleep(0.03)
        return endpoint.id

    for _ in range(20):
        await lb.call("digits", "1", takes_30ms, timeout=5)
    tried: list[str] = []

    async def fails_after_15ms(endpoint: Endpoint, _remaining: float | None) -> str:
        tried.append(endpoint.id)
        await asyncio.sleep(0.015)
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)

    # 15 ms of 35 are spent; the 20 ms left are below the model's ~30 ms median.
    with pytest.raises(NoEndpointAvailable, match="deadline too short"):
        await lb.call("digits", "1", fails_after_15ms, timeout=0.035)
    assert len(tried) == 1
    # With time to spare, the same failure is retried.
    with pytest.raises(NoEndpointAvailable, match="3 attempts failed"):
        await lb.call("digits", "1", fails_after_15ms, timeout=5)


async def test_an_attempt_that_ignores_its_deadline_is_cut_off() -> None:
    lb = make_balancer(1, attempt_grace_ms=10)

    async def hangs(_endpoint: Endpoint, _remaining: float | None) -> str:
        await asyncio.sleep(10)
        return "never"

    with pytest.raises(AttemptFailed) as raised:
        await lb.call("digits", "1", hangs, timeout=0.05)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert lb.endpoints()[0].load.pending == 0


async def test_consecutive_failures_eject_and_the_endpoint_returns_by_itself() -> None:
    clock = FakeClock()
    lb = make_balancer(
        4, clock=clock, backoff_base_ms=0, ejection_consecutive_failures=3, ejection_base_s=10, max_ejection_percent=50
    )
    down = rpc_error(grpc.StatusCode.UNAVAILABLE)
    dead = next(e for e in lb.endpoints() if e.id == "w0")

    async def fail_on_w0(endpoint: Endpoint, _remaining: float | None) -> str:
        if endpoint is dead:
            raise down
        return endpoint.id

    lb.set_model_policy("digits", ModelPolicy(policy="round_robin"))
    while dead.state is EndpointState.ACTIVE:
        assert await lb.call("digits", "1", fail_on_w0, timeout=5) != "w0"
    assert dead.state is EndpointState.EJECTED
    assert sample(lb, "meshserve_ejections_total", model="digits") == 1
    assert sample(lb, "meshserve_endpoints", model="digits", state="ejected") == 1
    assert sample(lb, "meshserve_endpoints", model="digits", state="active") == 3
    served = {await lb.call("digits", "1", fail_on_w0, timeout=5) for _ in range(12)}
    assert "w0" not in served

    clock.now += 10
    assert dead.state is EndpointState.ACTIVE  # back by itself after the base interval
    assert sample(lb, "meshserve_endpoints", model="digits", state="active") == 4
    while dead.state is EndpointState.ACTIVE:
        await lb.call("digits", "1", fail_on_w0, timeout=5)
    clock.now += 10
    assert dead.state is EndpointState.EJECTED  # the second ejection lasts twice as long
    clock.now += 10
    assert dead.state is EndpointState.ACTIVE


async def test_never_more_than_the_max_share_of_a_set_is_ejected() -> None:
    clock = FakeClock()
    lb = make_balancer(
        3, clock=clock, backoff_base_ms=0, ejection_consecutive_failures=2, max_ejection_percent=50, max_attempts=1
    )
    down = rpc_error(grpc.StatusCode.UNAVAILABLE)
    script = Script({"w0": down, "w1": down})
    lb.set_model_policy("digits", ModelPolicy(policy="round_robin"))
    for _ in range(30):
        with contextlib.suppress(NoEndpointAvailable):
            await lb.call("digits", "1", script, timeout=5)
    states = [e.state for e in lb.endpoints()]
    assert states.count(EndpointState.EJECTED) == 1


async def test_a_single_endpoint_set_can_be_fully_ejected_only_when_allowed() -> None:
    clock = FakeClock()
    lb = make_balancer(1, clock=clock, ejection_consecutive_failures=1, max_ejection_percent=100)
    with pytest.raises(NoEndpointAvailable):
        await lb.call("digits", "1", Script({"w0": rpc_error(grpc.StatusCode.UNAVAILABLE)}), timeout=5)
    with pytest.raises(NoEndpointAvailable, match="all 1 endpoints ejected"):
        await lb.call("digits", "1", Script({}), timeout=5)


async def test_small_caller_deadlines_do_not_eject_a_worker() -> None:
    lb = make_balancer(2, ejection_consecutive_failures=1, ejection_deadline_floor_ms=100)
    script = Script(
        {"w0": rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), "w1": rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)}
    )
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await lb.call("digits", "1", script, timeout=0.01)
    assert {e.state for e in lb.endpoints()} == {EndpointState.ACTIVE}
    with pytest.raises(grpc.aio.AioRpcError):
        await lb.call("digits", "1", script, timeout=1.0)
    assert EndpointState.EJECTED in {e.state for e in lb.endpoints()}


async def test_hedge_goes_to_another_endpoint_and_cancels_the_loser() -> None:
    events: list[AttemptEvent] = []
    lb = make_balancer(2, events=events, hedge_default_delay_ms=20)
    lb.set_model_policy("digits", ModelPolicy(hedge=True))
    stuck = asyncio.Event()
    cancelled: list[str] = []

    async def one_slow(endpoint: Endpoint, _remaining: float | None) -> str:
        if not stuck.is_set():
            stuck.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(endpoint.id)
                raise
        return endpoint.id

    winner = await lb.call("digits", "1", one_slow, timeout=10)
    assert len(cancelled) == 1 and cancelled[0] != winner
    assert {(e.endpoint.id, e.outcome, e.hedge) for e in events} == {
        (cancelled[0], "cancelled", False),
        (winner, "ok", True),
    }
    assert sample(lb, "meshserve_retries_total", model="digits", reason="hedge") == 1
    assert all(e.load.pending == 0 for e in lb.endpoints())


async def test_no_hedge_when_the_first_answer_comes_in_time_or_the_budget_is_spent() -> None:
    lb = make_balancer(2, hedge_default_delay_ms=200, retry_budget_min_per_s=0, retry_budget_ratio=0)
    lb.set_model_policy("digits", ModelPolicy(hedge=True))
    script = Script({})
    await lb.call("digits", "1", script, timeout=5)
    assert len(script.tried) == 1

    lb = make_balancer(2, hedge_default_delay_ms=1, retry_budget_min_per_s=0, retry_budget_ratio=0)
    lb.set_model_policy("digits", ModelPolicy(hedge=True))

    async def slowish(endpoint: Endpoint, _remaining: float | None) -> str:
        script.tried.append(endpoint.id)
        await asyncio.sleep(0.02)
        return endpoint.id

    script.tried.clear()
    await lb.call("digits", "1", slowish, timeout=5)
    assert len(script.tried) == 1
    assert sample(lb, "meshserve_retry_budget_exhausted_total", model="digits") == 1


async def test_hedge_delay_follows_the_models_p95() -> None:
    lb = make_balancer(2, hedge_min_samples=20, hedge_default_delay_ms=500)
    for _ in range(40):
        await lb.call("digits", "1", Script({}), timeout=5)
    lb.set_model_policy("digits", ModelPolicy(hedge=True))
    tried: list[str] = []

    async def first_hangs(endpoint: Endpoint, _remaining: float | None) -> str:
        tried.append(endpoint.id)
        if len(tried) == 1:
            await asyncio.sleep(30)
        return endpoint.id

    # The p95 of instant answers is tiny, so the hedge goes out long before the 500 ms default.
    await asyncio.wait_for(lb.call("digits", "1", first_hangs, timeout=10), timeout=0.4)
    assert len(tried) == 2


async def test_each_attempt_is_a_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lb = make_balancer(2, backoff_base_ms=0)
    lb._tracer = provider.get_tracer("test")
    script = Script({"w0": rpc_error(grpc.StatusCode.UNAVAILABLE), "w1": rpc_error(grpc.StatusCode.UNAVAILABLE)})
    lb.set_model_policy("digits", ModelPolicy(policy="round_robin"))
    with pytest.raises(NoEndpointAvailable):
        await lb.call("digits", "1", script, timeout=5)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["balancer.attempt", "balancer.attempt"]
    attributes = [dict(s.attributes or {}) for s in spans]
    assert [a["meshserve.attempt"] for a in attributes] == [1, 2]
    assert {a["meshserve.endpoint"] for a in attributes} == {"127.0.0.1:50000", "127.0.0.1:50001"}
    assert {a["meshserve.outcome"] for a in attributes} == {"unavailable"}
    assert {a["meshserve.policy"] for a in attributes} == {"round_robin"}
    assert {a["meshserve.hedge"] for a in attributes} == {False}


@pytest.mark.parametrize("sampled", [True, False])
async def test_an_unsampled_request_gets_no_attempt_span(sampled: bool) -> None:
    """Under an unsampled server span no built-in sampler would record the attempt: it is not even built,
    and the attempt runs with the server span current (its traceparent says "not sampled" downstream)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lb = make_balancer(1)
    lb._tracer = provider.get_tracer("test")
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    server = trace.SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False, flags)
    seen: list[trace.SpanContext] = []

    async def attempt(endpoint: Endpoint, _remaining: float | None) -> str:
        seen.append(trace.get_current_span().get_span_context())
        return endpoint.id

    with trace.use_span(trace.NonRecordingSpan(server)):
        await lb.call("digits", "1", attempt, timeout=5)
    (current,) = seen
    assert current.trace_id == server.trace_id
    if sampled:
        assert current.span_id != server.span_id
        assert [s.name for s in exporter.get_finished_spans()] == ["balancer.attempt"]
    else:
        assert current == server
        assert not exporter.get_finished_spans()
