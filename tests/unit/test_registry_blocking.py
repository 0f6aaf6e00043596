"""Client-side blocking-query mechanics against a scripted transport: index resets, no spinning,
stale data while the agent is unreachable."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from registry.blocking import BlockingQuery
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings

Step = tuple[int, str] | BaseException


class Script:
    """Answers each fetch with the next step and records what it was asked."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = list(steps)
        self.asked: list[int] = []

    async def __call__(self, index: int, wait: str) -> tuple[int, str]:
        self.asked.append(index)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def make(script: Script, metrics: RegistryMetrics | None = None) -> tuple[BlockingQuery[str], list[float]]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    settings = RegistrySettings(registry_watch_wait_s=30, registry_backoff_initial_s=0.1, registry_backoff_max_s=2)
    return BlockingQuery("test", script, settings, metrics, sleep=sleep), sleeps


async def test_follows_the_index() -> None:
    script = Script([(5, "a"), (7, "b")])
    query, sleeps = make(script)
    assert await query.next_change() == "a"
    assert await query.next_change() == "b"
    assert script.asked == [0, 5] and sleeps == []


async def test_index_going_backwards_resets_to_zero() -> None:
    script = Script([(50, "a"), (3, "after restart"), (3, "after restart"), (4, "c")])
    query, _ = make(script)
    await query.next_change()
    assert await query.next_change() == "after restart"
    assert query.index == 0
    assert await query.next_change() == "after restart"  # the non-blocking re-read picks up index 3
    assert await query.next_change() == "c"
    assert script.asked == [0, 50, 0, 3]


async def test_instant_answers_with_the_same_index_back_off_instead_of_spinning() -> None:
    script = Script([(5, "a"), (5, "a"), (5, "a"), (5, "a"), (6, "b")])
    query, sleeps = make(script)
    await query.next_change()
    assert await query.next_change() == "b"
    assert len(sleeps) == 3
    assert sleeps[0] <= 0.1 and sleeps[2] > sleeps[0]  # growing


async def test_zero_index_is_treated_as_one() -> None:
    query, _ = make(Script([(0, "a")]))
    await query.next_change()
    assert query.index == 1


@pytest.mark.parametrize("error", [aiohttp.ClientConnectionError("refused"), TimeoutError(), OSError("reset")])
async def test_unreachable_agent_marks_stale_backs_off_and_resumes(error: BaseException) -> None:
    metrics = RegistryMetrics(CollectorRegistry())
    stale_seen: list[bool] = []
    script = Script([(5, "a"), error, error, error, (6, "b")])
    query, sleeps = make(script, metrics)
    await query.next_change()

    original: Callable[[int, str], object] = script.__call__

    async def observing(index: int, wait: str) -> tuple[int, str]:
        stale_seen.append(query.stale)
        return await original(index, wait)  # type: ignore[misc]

    query._fetch = observing  # type: ignore[assignment]
    assert await query.next_change() == "b"
    assert stale_seen == [False, True, True, True]
    assert not query.stale
    assert len(sleeps) == 3 and sleeps[1] > sleeps[0] / 2
    assert metrics.errors.labels("test")._value.get() == 3
    assert metrics.stale.labels("test")._value.get() == 0
    assert script.asked == [0, 5, 0, 0, 0]  # after a failure, reads without blocking until one answers


async def test_after_a_failure_an_index_equal_to_the_old_one_does_not_hide_the_new_data() -> None:
    # A restarted agent whose index came back to the same number, with different data behind it.
    script = Script([(5, "before"), aiohttp.ClientConnectionError("refused"), (5, "after restart"), (6, "c")])
    query, _ = make(script)
    assert await query.next_change() == "before"
    assert await query.next_change() == "after restart"
    assert not query.stale
    assert await query.next_change() == "c"
    assert script.asked == [0, 5, 0, 5]
