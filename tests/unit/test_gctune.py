"""meshserve.gctune: the serving processes' collector settings follow MESHSERVE_GC_GEN0_THRESHOLD."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from meshserve import gctune


@pytest.fixture(autouse=True)
def restore_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_default_raises_only_the_young_generation_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    gctune.tune_for_serving()
    assert gc.get_threshold() == (100_000, 10, 10)


def test_variable_sets_the_threshold_and_zero_keeps_pythons(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.set_threshold(700, 10, 10)
    monkeypatch.setenv("MESHSERVE_GC_GEN0_THRESHOLD", "5000")
    gctune.tune_for_serving()
    assert gc.get_threshold()[0] == 5000
    monkeypatch.setenv("MESHSERVE_GC_GEN0_THRESHOLD", "0")
    gc.set_threshold(700, 10, 10)
    gctune.tune_for_serving()
    assert gc.get_threshold()[0] == 700


def test_freeze_moves_live_objects_out_of_collected_generations() -> None:
    try:
        gctune.freeze_startup_objects()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
