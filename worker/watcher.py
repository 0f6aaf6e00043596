"""Hot loading: the worker follows its model repository without a restart.

A cheap periodic scan (a stat of each model directory's entries, no file
reads) compares what the repository holds, after each model's version policy,
with what is loaded:

- a new version (published atomically by `meshserve model publish`) is
  verified against its manifest, loaded and warmed up by
  `ModelRepository.load_version`, and only then advertised: the repository's
  change listeners update the registry tags;
- a removed version leaves the registry tags first, keeps answering while
  balancers catch up, finishes its queued work, then unloads.

A version that fails to load is logged once and retried only when its files
change; it never disturbs the versions that work. A model whose config.yaml
is unreadable keeps serving what it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from worker.config import ConfigError, load_model_config
from worker.repository import ModelRepository, available_versions

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def wanted_versions(root: Path) -> dict[str, set[int] | None]:
    """Model name -> versions its policy selects on disk now; None for a model whose config cannot be read."""
    wanted: dict[str, set[int] | None] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            config = load_model_config(model_dir)
        except ConfigError:
            wanted[model_dir.name] = None
            continue
        wanted[model_dir.name] = set(config.version_policy.select(available_versions(model_dir)))
    return wanted


def fingerprint(version_dir: Path) -> Fingerprint:
    """Names, sizes and modification times of a version's files: changes when someone fixes or replaces them."""
    entries = []
    for path in sorted(version_dir.iterdir()):
        with contextlib.suppress(OSError):
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class RepositoryWatcher:
    def __init__(self, repository: ModelRepository, interval_s: float, unload_drain_s: float) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self.unload_drain_s = unload_drain_s
        self._refused: dict[tuple[str, int], Fingerprint] = {}
        self._unloading: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unreadable: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository watcher")
        log.info("watching %s for new and removed versions every %.1fs", self.repository.root, self.interval_s)

    async def stop(self) -> None:
        tasks = [task for task in (self._task, *self._unloading.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._unloading.clear()

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync()
                failing = False
            except Exception:
                if not failing:  # once per outage, not once per scan
                    log.exception("scanning model repository %s failed; will keep trying", self.repository.root)
                failing = True

    async def sync(self) -> None:
        """One pass: load what appeared, drain and unload what disappeared."""
        root = self.repository.root
        wanted = await asyncio.to_thread(wanted_versions, root)
        for name, versions in sorted(wanted.items()):
            if versions is None:
                if name not in self._unreadable:
                    log.error("model %s: config.yaml cannot be read; keeping its loaded versions", name)
                    self._unreadable.add(name)
                continue
            self._unreadable.discard(name)
            loaded = set(self.repository.versions(name))
            for version in sorted(versions - loaded):
                await self._load(name, version)
        for name, version in list(self._refused):
            versions = wanted.get(name, set())
            if versions is not None and version not in versions:  # gone from disk: forget why it failed
                del self._refused[(name, version)]
                self.repository.failures.pop(f"{name}:{version}", None)
        for name, version in self.repository.served():
            versions = wanted.get(name, set())
            if versions is not None and version not in versions and (name, version) not in self._unloading:
                task = asyncio.get_running_loop().create_task(self._unload(name, version))
                self._unloading[(name, version)] = task

    async def _load(self, name: str, version: int) -> None:
        key = (name, version)
        version_dir = self.repository.root / name / str(version)
        files = await asyncio.to_thread(fingerprint, version_dir)
        if self._refused.get(key) == files:
            return  # same bytes that failed before: do not retry (or log) every scan
        try:
            await self.repository.load_version(name, version)
        except Exception as exc:  # any failure stays with this version; the others keep serving
            self._refused[key] = files
            reason = str(exc) or type(exc).__name__
            self.repository.failures[f"{name}:{version}"] = reason
            log.error("cannot serve model %s:%d: %s", name, version, reason, extra={"model": f"{name}:{version}"})
            return
        self._refused.pop(key, None)
        log.info("hot-loaded model %s version %d", name, version, extra={"model": f"{name}:{version}"})

    async def _unload(self, name: str, version: int) -> None:
        try:
            log.info(
                "model %s version %d left the repository: draining for %.1fs, then unloading",
                name,
                version,
                self.unload_drain_s,
                extra={"model": f"{name}:{version}"},
            )
            await self.repository.unload_version(name, version, drain_s=self.unload_drain_s)
        except Exception:
            log.exception("unloading model %s version %d failed", name, version)
        finally:
            self._unloading.pop((name, version), None)
