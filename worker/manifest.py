"""Integrity manifests for published model versions.

`meshserve model publish` writes `REPO/<model>/<version>/manifest.json`:

    {"files": {"model.onnx": "<sha256 hex>"}, "created": "<UTC ISO 8601>", "meshserve_version": "0.1.0"}

The worker verifies it before loading a version, so bytes that changed after
publish (a bad copy, a truncated transfer, tampering) are refused instead of
served. A version directory without a manifest predates this check and is
loaded as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class ManifestError(Exception):
    """A version directory whose files do not match its manifest (or whose manifest is unreadable)."""


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    meshserve_version: str = ""

    def to_json(self) -> str:
        body = {"files": dict(sorted(self.files.items())), "created": self.created}
        body["meshserve_version"] = self.meshserve_version
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source} is not valid JSON ({exc}); republish the version") from exc
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, dict) or not files:
            raise ManifestError(f"{source} has no 'files' map; republish the version")
        for name, digest in files.items():
            if not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64:
                raise ManifestError(f"{source}: entry {name!r} is not a file name with a SHA-256 hex digest")
            _check_relative(name, source)
        return cls(
            files=dict(files),
            created=str(body.get("created", "")),
            meshserve_version=str(body.get("meshserve_version", "")),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _software_version() -> str:
    try:
        return metadata.version("meshserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _check_relative(name: str, source: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name != path.as_posix():
        raise ManifestError(f"{source}: file name {name!r} must be a plain relative path inside the version")


def build_manifest(version_dir: Path, meshserve_version: str | None = None) -> Manifest:
    """Hashes every file under `version_dir` (the manifest itself excepted)."""
    files = {
        path.relative_to(version_dir).as_posix(): sha256_file(path)
        for path in sorted(version_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    if not files:
        raise ManifestError(f"{version_dir} holds no files to put in a manifest")
    return Manifest(files=files, meshserve_version=meshserve_version or _software_version())


def write_manifest(version_dir: Path, manifest: Manifest) -> Path:
    """Writes the manifest durably (fsync), since publish renames the directory right after."""
    path = version_dir / MANIFEST_NAME
    with path.open("w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_manifest(version_dir: Path) -> Manifest | None:
    """The version's manifest, or None when it has none."""
    path = version_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    return Manifest.from_json(text, source=str(path))


def verify_version_dir(version_dir: Path) -> Manifest | None:
    """Checks every file the manifest lists; raises ManifestError naming the first bad file.

    Returns the manifest, or None for a version published without one.
    """
    manifest = read_manifest(version_dir)
    if manifest is None:
        return None
    for name, expected in sorted(manifest.files.items()):
        path = version_dir / name
        if not path.is_file():
            raise ManifestError(
                f"{path} is listed in {MANIFEST_NAME} but missing: the version is incomplete; republish it"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"{path} does not match {MANIFEST_NAME} (SHA-256 {actual[:16]}..., expected {expected[:16]}...): "
                "the file changed after publish; republish the version or restore the original bytes"
            )
    return manifest
