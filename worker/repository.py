"""The model repository in Triton's layout: `ROOT/<model>/<version>/model.onnx` (+ `ROOT/<model>/config.yaml`).

`load_version` / `unload_version` are the primitives that hot-loading and the
repository watcher build on; `served()` lists what is live. A model version
that fails to load is logged with its path and reason and never stops the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import grpc

from meshserve.busywait import BusyWait
from worker.batcher import Batcher
from worker.config import ConfigError, ModelConfig, load_model_config
from worker.errors import InferenceError
from worker.manifest import ManifestError, verify_version_dir
from worker.metrics import WorkerMetrics
from worker.runtime import ModelLoadError, OnnxModel, usable_providers

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


@dataclass(slots=True)
class ServedModel:
    """A live model version: the session and the batcher in front of it."""

    model: OnnxModel
    batcher: Batcher

    @property
    def key(self) -> tuple[str, int]:
        return self.model.name, self.model.version


def available_versions(model_dir: Path) -> list[int]:
    """Version directories (positive integers) that hold a model file."""
    versions = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILE).is_file():
            versions.append(int(child.name))
    return sorted(versions)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        executor: Executor,
        metrics: WorkerMetrics,
        tracing: bool = False,
    ) -> None:
        self.root = root
        self.executor = executor
        self.metrics = metrics
        self.tracing = tracing
        self._models: dict[str, dict[int, ServedModel]] = {}
        self.failures: dict[str, str] = {}  # "name:version" or "name" -> why it is not served
        self._listeners: list[Callable[[], None]] = []
        self._providers: list[str] | None = None
        # Versions being unloaded: still answering, no longer advertised (see unload_version).
        self._retiring: set[tuple[str, int]] = set()
        self._busy_wait = BusyWait()  # shared by every batcher of this worker (one event loop)

    # -- what is served --------------------------------------------------

    def served(self) -> list[tuple[str, int]]:
        """The versions to advertise: loaded and not retiring."""
        return sorted(
            (name, version)
            for name, versions in self._models.items()
            for version in versions
            if (name, version) not in self._retiring
        )

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def versions_of(self, name: str) -> list[ServedModel]:
        return list(self._models.get(name, {}).values())

    def queue_depth(self, name: str) -> int:
        """Requests waiting in the batchers of every loaded version of `name`.

        Also read by the /metrics thread at scrape time: `tuple()` copies the
        versions in one step under the GIL, so a load or unload cannot change
        the dict mid-iteration.
        """
        return sum(served.batcher.depth for served in tuple(self._models.get(name, {}).values()))

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model version a request names; the newest version when `version` is empty. NOT_FOUND otherwise."""
        versions = self._models.get(name)
        if not versions:
            raise InferenceError(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'; served: {self.model_names()}")
        if not version:
            return versions[max(versions)]
        served = versions.get(int(version)) if version.isdigit() else None
        if served is None:
            why = self.failures.get(f"{name}:{version}")
            raise InferenceError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{name}' has no version '{version}'; served versions: {sorted(versions)}"
                + (f" (version {version} was refused: {why})" if why else ""),
            )
        return served

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after every load or unload (e.g. to update registry tags)."""
        self._listeners.append(listener)

    # -- loading -----------------------------------------------------------

    def scan(self) -> dict[str, list[int]]:
        """Model name -> versions its config's version policy selects, as found on disk now."""
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                config = load_model_config(model_dir)
            except ConfigError as exc:
                self._fail(model_dir.name, str(exc))
                continue
            versions = config.version_policy.select(available_versions(model_dir))
            if not versions:
                self._fail(model_dir.name, f"{model_dir}: no version directory with a {MODEL_FILE}")
                continue
            found[model_dir.name] = versions
        return found

    async def load_all(self) -> None:
        """Loads every version `scan()` selects; failures are logged and skipped."""
        for name, versions in self.scan().items():
            for version in versions:
                try:
                    await self.load_version(name, version)
                except (ModelLoadError, ConfigError) as exc:
                    self._fail(f"{name}:{version}", str(exc))

    async def load_version(self, name: str, version: int) -> ServedModel:
        """Loads (or reloads) one version: session, warm-up, batcher. Replaces a loaded one only on success."""
        model_dir = self.root / name
        config = load_model_config(model_dir)
        path = model_dir / str(version) / MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        loop = asyncio.get_running_loop()
        if self._providers is None:
            self._providers = await loop.run_in_executor(self.executor, usable_providers)
        model = await loop.run_in_executor(self.executor, self._open, name, version, path, config, self._providers)
        model_metrics = self.metrics.for_model(name)
        batcher = Batcher(model, self.executor, model_metrics, tracing=self.tracing, busy_wait=self._busy_wait)
        # Computed when scraped, for all versions of the model together, not set on every request.
        model_metrics.queue_depth.set_function(functools.partial(self.queue_depth, name))
        batcher.start()
        previous = self._models.setdefault(name, {}).get(version)
        self._models[name][version] = ServedModel(model, batcher)
        self.failures.pop(f"{name}:{version}", None)
        self.failures.pop(name, None)
        if previous is not None:
            await previous.batcher.stop()
        log.info(
            "loaded model %s version %d on %s (batching %s)",
            name,
            version,
            model.provider,
            f"up to {model.max_batch_size}" if model.batchable else "off",
            extra={"model": f"{name}:{version}", "provider": model.provider},
        )
        self._changed()
        return self._models[name][version]

    async def unload_version(self, name: str, version: int, drain_s: float = 0.0) -> None:
        """Stops serving one version. With `drain_s`, it first leaves the advertised list (registry tags) and
        keeps answering for `drain_s` seconds while balancers catch up, then finishes its queued work before it
        stops; without, requests still queued for it get UNAVAILABLE."""
        if version not in self._models.get(name, {}):
            return
        if drain_s > 0:
            self._retiring.add((name, version))
            self._changed()
            try:
                await asyncio.sleep(drain_s)
            finally:
                self._retiring.discard((name, version))
        versions = self._models.get(name, {})
        served = versions.pop(version, None)
        if not versions:
            self._models.pop(name, None)
        if served is None:
            return
        if drain_s > 0:
            await _wait_idle(served.batcher, max(drain_s, 5.0))
        await served.batcher.stop()
        log.info("unloaded model %s version %d", name, version, extra={"model": f"{name}:{version}"})
        self._changed()

    async def close(self) -> None:
        for name, versions in list(self._models.items()):
            for version in list(versions):
                await self.unload_version(name, version)

    @staticmethod
    def _open(name: str, version: int, path: Path, config: ModelConfig, providers: list[str]) -> OnnxModel:
        try:
            verify_version_dir(path.parent)
        except ManifestError as exc:
            raise ModelLoadError(f"refused: {exc}") from exc
        model = OnnxModel(name, version, path, config, providers)
        model.warm_up()
        return model

    def _fail(self, what: str, reason: str) -> None:
        self.failures[what] = reason
        log.error("cannot serve model %s: %s", what, reason, extra={"model": what})

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()


async def _wait_idle(batcher: Batcher, limit_s: float) -> None:
    """Waits until the batcher has nothing queued or running (seen twice, so a request that resolved the
    version just before it was unlisted has had its turn to enqueue), or `limit_s` seconds pass."""
    loop = asyncio.get_running_loop()
    until = loop.time() + limit_s
    quiet = 0
    while quiet < 2 and loop.time() < until:
        quiet = quiet + 1 if not (batcher.depth or batcher.running) else 0
        await asyncio.sleep(0.02)
