"""`meshserve model publish`: a model file becomes the next version of a model in a repository, atomically.

The version is assembled in a hidden temporary directory inside the model's
own directory (same filesystem), its bytes and manifest fsynced, and only then
renamed to `<next version>`: a rename is atomic, so a worker scanning the
repository sees either no new version or a complete one, never half a model.
Publishers of the same model serialise on a lock file, so two of them never
pick the same number.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meshserve import __version__
from meshserve.modeltools import sessions
from meshserve.modeltools.errors import ModelToolError
from worker.config import CONFIG_FILE, ConfigError, load_model_config
from worker.manifest import Manifest, build_manifest, write_manifest
from worker.repository import MODEL_FILE

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOCK_FILE = ".publish.lock"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class PublishReport:
    name: str
    version: int
    path: Path
    manifest: Manifest
    config_written: bool


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ModelToolError(
            f"model name {name!r} must start with a letter or digit and hold only letters, digits, '.', '_' or '-'"
        )


def existing_versions(model_dir: Path) -> list[int]:
    """Every positive-integer version directory, with or without a model file (a number once used stays used)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


@contextlib.contextmanager
def model_lock(model_dir: Path) -> Iterator[None]:
    """Serialises publishers and unpackers of one model (advisory lock on a hidden file)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with (model_dir / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def staging_dir(model_dir: Path) -> Path:
    """A hidden directory beside the versions (so on the same filesystem) that scanners ignore."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_version(staged: Path, model_dir: Path, version: int) -> Path:
    """Renames a complete, fsynced staging directory to `model_dir/<version>` (caller holds the model lock)."""
    target = model_dir / str(version)
    if target.exists():
        raise ModelToolError(f"{target} already exists; versions are never overwritten")
    fsync_dir(staged)
    os.rename(staged, target)
    fsync_dir(model_dir)
    return target


def install_config(source: Path, model_dir: Path) -> None:
    """Validates a config.yaml with the worker's own rules, then replaces the model's config atomically."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=model_dir) as scratch:
        staged = Path(scratch) / CONFIG_FILE
        shutil.copyfile(source, staged)
        try:
            load_model_config(Path(scratch))
        except ConfigError as exc:
            raise ModelToolError(f"{source} is not a valid model config: {exc}") from exc
        with staged.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, model_dir / CONFIG_FILE)


def publish(model_file: Path, repository: Path, name: str, config: Path | None = None) -> PublishReport:
    check_name(name)
    if not model_file.is_file():
        raise ModelToolError(f"{model_file} does not exist")
    if config is not None and not config.is_file():
        raise ModelToolError(f"config {config} does not exist")
    sessions.open_session(model_file)  # never publish what ONNX Runtime cannot load
    model_dir = repository / name
    with model_lock(model_dir):
        staged = staging_dir(model_dir)
        try:
            shutil.copyfile(model_file, staged / MODEL_FILE)
            with (staged / MODEL_FILE).open("rb") as handle:
                os.fsync(handle.fileno())
            manifest = build_manifest(staged, __version__)
            write_manifest(staged, manifest)
            if config is not None:
                install_config(config, model_dir)
            version = max(existing_versions(model_dir), default=0) + 1
            path = install_version(staged, model_dir, version)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return PublishReport(name, version, path, manifest, config is not None)
