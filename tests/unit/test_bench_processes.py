"""The bench and the image smoke test read each model's provider off the worker's own load line."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bench.processes import worker_providers
from tests.worker_models import add_model, save
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository


async def test_the_provider_is_read_off_what_the_worker_logs_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(add_model(1.0), tmp_path, "plus_one")
    caplog.set_level(logging.INFO, logger="worker.repository")
    executor = ThreadPoolExecutor(1)
    repository = ModelRepository(tmp_path, executor, WorkerMetrics(CollectorRegistry()))
    try:
        await repository.load_version("plus_one", 1)
    finally:
        await repository.close()
        executor.shutdown(wait=True)
    assert worker_providers(caplog.text + "\nunrelated line\n") == {"plus_one": "CPUExecutionProvider"}
