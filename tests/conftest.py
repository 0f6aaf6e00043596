"""Shared fixtures: the demo model repository (built once per session) and a
process group that tears every started process down, even on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ProcessGroup

# Tests compare answers with CPU ONNX Runtime to the last digits and reason about CPU run times, so on a GPU host
# they and every process they start run on the CPU; tests/integration/test_worker_gpu.py asks for the GPU back.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(group.dump_logs())
        group.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model repository, written once per test session."""
    from meshserve.demo_models import write_demo_repository

    root = tmp_path_factory.mktemp("demo-models")
    write_demo_repository(root)
    return root
