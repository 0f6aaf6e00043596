"""The worker side of the lifecycle, in process: manifest checks at load, and the repository watcher."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from meshserve.modeltools.publish import publish
from worker.errors import InferenceError
from worker.manifest import Manifest, ManifestError
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository
from worker.runtime import ModelLoadError
from worker.watcher import RepositoryWatcher, wanted_versions


@pytest.fixture
def digits_file(demo_repository: Path) -> Path:
    return demo_repository / "digits" / "1" / "model.onnx"


@pytest.fixture
async def repository(tmp_path: Path) -> AsyncIterator[ModelRepository]:
    executor = ThreadPoolExecutor(2)
    repo = ModelRepository(tmp_path / "repo", executor, WorkerMetrics(CollectorRegistry()))
    (tmp_path / "repo").mkdir()
    try:
        yield repo
    finally:
        await repo.close()
        executor.shutdown(wait=True)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


async def test_load_refuses_tampered_bytes_and_not_found_says_why(
    repository: ModelRepository, digits_file: Path
) -> None:
    publish(digits_file, repository.root, "digits")
    publish(digits_file, repository.root, "digits")
    flip_a_byte(repository.root / "digits" / "2" / "model.onnx")
    await repository.load_all()
    assert repository.served() == [("digits", 1)]
    assert "does not match manifest.json" in repository.failures["digits:2"]
    with pytest.raises(InferenceError) as refused:
        repository.get("digits", "2")
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert "refused" in refused.value.message and "manifest.json" in refused.value.message
    with pytest.raises(ModelLoadError, match="manifest"):
        await repository.load_version("digits", 2)


async def test_watcher_loads_new_versions_and_unloads_removed_ones(
    repository: ModelRepository, digits_file: Path
) -> None:
    publish(digits_file, repository.root, "digits")
    await repository.load_all()
    changes: list[list[tuple[str, int]]] = []
    repository.on_change(lambda: changes.append(repository.served()))
    watcher = RepositoryWatcher(repository, interval_s=60, unload_drain_s=30)

    publish(digits_file, repository.root, "digits")
    publish(digits_file, repository.root, "other")
    await watcher.sync()
    assert repository.served() == [("digits", 1), ("digits", 2), ("other", 1)]

    shutil.rmtree(repository.root / "digits" / "1")
    await watcher.sync()
    await asyncio.sleep(0)  # the unload task starts: off the advertised list, then the drain wait
    # Draining: still answers, no longer advertised.
    assert repository.served() == [("digits", 2), ("other", 1)]
    assert repository.get("digits", "1").model.version == 1
    await watcher.stop()  # cancels the drain wait: the version is unloaded right away
    await repository.unload_version("digits", 1)
    assert repository.versions("digits") == [2]
    assert changes[-1] == [("digits", 2), ("other", 1)]


async def test_unload_waits_out_the_drain_before_stopping(repository: ModelRepository, digits_file: Path) -> None:
    publish(digits_file, repository.root, "digits")
    publish(digits_file, repository.root, "digits")
    await repository.load_all()
    unloaded = asyncio.Event()
    repository.on_change(lambda: unloaded.set() if repository.versions("digits") == [1] else None)
    watcher = RepositoryWatcher(repository, interval_s=60, unload_drain_s=0.05)
    shutil.rmtree(repository.root / "digits" / "2")
    await watcher.sync()
    await asyncio.sleep(0)
    assert (repository.served(), repository.versions("digits")) == ([("digits", 1)], [1, 2])  # draining
    async with asyncio.timeout(10):
        await unloaded.wait()
    assert repository.served() == [("digits", 1)]


async def test_a_failing_version_is_retried_only_when_its_files_change(
    repository: ModelRepository, digits_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish(digits_file, repository.root, "digits")
    await repository.load_all()
    version_dir = repository.root / "digits" / "2"
    version_dir.mkdir()
    (version_dir / "model.onnx").write_bytes(b"not onnx")
    watcher = RepositoryWatcher(repository, interval_s=60, unload_drain_s=0)
    for _ in range(3):
        await watcher.sync()
    assert sum("cannot serve model digits:2" in r.getMessage() for r in caplog.records) == 1
    assert repository.served() == [("digits", 1)]  # the working version never noticed

    shutil.copyfile(digits_file, version_dir / "model.onnx")
    await watcher.sync()
    assert repository.served() == [("digits", 1), ("digits", 2)]


async def test_unreadable_config_keeps_loaded_versions(repository: ModelRepository, digits_file: Path) -> None:
    publish(digits_file, repository.root, "digits")
    await repository.load_all()
    (repository.root / "digits" / "config.yaml").write_text("max_batch_size: [oops\n")
    assert wanted_versions(repository.root) == {"digits": None}
    watcher = RepositoryWatcher(repository, interval_s=60, unload_drain_s=0)
    await watcher.sync()
    assert repository.served() == [("digits", 1)]


def test_manifest_parsing_rejects_what_it_cannot_trust() -> None:
    digest = "a" * 64
    assert Manifest.from_json(f'{{"files": {{"model.onnx": "{digest}"}}}}').files == {"model.onnx": digest}
    for text, why in [
        ("{", "not valid JSON"),
        ('{"files": {}}', "no 'files'"),
        ('{"files": {"model.onnx": "abc"}}', "SHA-256"),
        (f'{{"files": {{"../model.onnx": "{digest}"}}}}', "plain relative path"),
    ]:
        with pytest.raises(ManifestError, match=why):
            Manifest.from_json(text)
