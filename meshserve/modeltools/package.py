"""`meshserve model package` / `unpack`: move a model, its config and manifests between hosts as one tar.gz.

Archive layout: `<name>/config.yaml` (when the model has one) and
`<name>/<version>/{model.onnx, manifest.json}`. Versions published without a
manifest get one computed at packaging, so the bytes are checked end to end
from then on. Unpacking verifies every manifest before any version appears in
the target repository, and installs each version with the same atomic rename
as publish.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from meshserve import __version__
from meshserve.modeltools.errors import ModelToolError
from meshserve.modeltools.publish import (
    check_name,
    existing_versions,
    install_config,
    install_version,
    model_lock,
    staging_dir,
)
from worker.config import CONFIG_FILE
from worker.manifest import MANIFEST_NAME, ManifestError, build_manifest, read_manifest, verify_version_dir


@dataclass(frozen=True)
class PackageReport:
    output: Path
    name: str
    versions: list[int]
    size_bytes: int


@dataclass
class UnpackReport:
    name: str
    installed: dict[int, int] = field(default_factory=dict)  # version in the archive -> version in the repository
    skipped: list[int] = field(default_factory=list)  # identical versions already present
    config: str = "none in archive"


def package(name: str, repository: Path, output: Path, versions: list[int] | None = None) -> PackageReport:
    check_name(name)
    model_dir = repository / name
    available = existing_versions(model_dir)
    if not available:
        raise ModelToolError(f"{model_dir} holds no versions to package; check --repository and the model name")
    chosen = sorted(versions) if versions else available
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ModelToolError(f"model {name} has no version(s) {missing}; it has {available}")

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        with tarfile.open(partial, "w:gz") as archive:
            if (model_dir / CONFIG_FILE).is_file():
                archive.add(model_dir / CONFIG_FILE, arcname=f"{name}/{CONFIG_FILE}")
            for version in chosen:
                _add_version(archive, name, model_dir / str(version))
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return PackageReport(output, name, chosen, output.stat().st_size)


def _add_version(archive: tarfile.TarFile, name: str, version_dir: Path) -> None:
    try:
        manifest = verify_version_dir(version_dir)
        if manifest is None:
            manifest = build_manifest(version_dir, __version__)
    except ManifestError as exc:
        raise ModelToolError(f"refusing to package a damaged version: {exc}") from exc
    prefix = f"{name}/{version_dir.name}"
    for relative in sorted(manifest.files):
        archive.add(version_dir / relative, arcname=f"{prefix}/{relative}")
    body = manifest.to_json().encode()
    info = tarfile.TarInfo(f"{prefix}/{MANIFEST_NAME}")
    info.size = len(body)
    info.mtime = int((version_dir / MANIFEST_NAME).stat().st_mtime) if (version_dir / MANIFEST_NAME).exists() else 0
    archive.addfile(info, io.BytesIO(body))


def _archive_name(archive: tarfile.TarFile, source: Path) -> str:
    """The one model the archive holds; refuses links, devices and paths that leave it."""
    names = set()
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise ModelToolError(f"{source} holds {member.name!r}, which is not a plain file inside the model")
        names.add(path.parts[0])
    if len(names) != 1:
        raise ModelToolError(f"{source} must hold exactly one model directory; it holds {sorted(names) or 'nothing'}")
    return names.pop()


def unpack(archive_path: Path, repository: Path, renumber: bool = False) -> UnpackReport:
    """Installs the archive's versions into `repository`; with `renumber`, as new versions after the newest."""
    if not archive_path.is_file():
        raise ModelToolError(f"{archive_path} does not exist")
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            name = _archive_name(archive, archive_path)
            check_name(name)
            model_dir = repository / name
            with model_lock(model_dir):
                scratch = staging_dir(model_dir)
                try:
                    archive.extractall(scratch, filter="data")
                    return _install(scratch / name, model_dir, renumber)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ModelToolError(
            f"cannot read {archive_path} as a tar.gz made by `meshserve model package`: {exc}"
        ) from exc


def _install(unpacked: Path, model_dir: Path, renumber: bool) -> UnpackReport:
    report = UnpackReport(model_dir.name)
    versions = existing_versions(unpacked)
    if not versions:
        raise ModelToolError(f"the archive holds no version directories for model {model_dir.name}")
    for version in versions:
        try:
            if verify_version_dir(unpacked / str(version)) is None:
                raise ManifestError(f"version {version} has no {MANIFEST_NAME}; repackage it with meshserve")
        except ManifestError as exc:
            raise ModelToolError(f"the archive is damaged, nothing was installed: {exc}") from exc
    if (unpacked / CONFIG_FILE).is_file():
        if not (model_dir / CONFIG_FILE).is_file():
            install_config(unpacked / CONFIG_FILE, model_dir)
            report.config = "installed"
        elif (model_dir / CONFIG_FILE).read_bytes() == (unpacked / CONFIG_FILE).read_bytes():
            report.config = "already present"
        else:
            report.config = f"kept the repository's own {CONFIG_FILE} (the archive's differs)"
    for version in versions:
        source = unpacked / str(version)
        if renumber:
            target_version = max(existing_versions(model_dir), default=0) + 1
        else:
            target_version = version
            present = model_dir / str(version)
            if present.exists():
                if _same_files(source, present):
                    report.skipped.append(version)
                    continue
                raise ModelToolError(
                    f"{present} already exists with different contents; unpack with --renumber to add the "
                    "archive's versions after the newest one"
                )
        # The scratch directory lies inside the model directory, so this is the same atomic rename as publish.
        install_version(source, model_dir, target_version)
        report.installed[version] = target_version
    return report


def _same_files(left: Path, right: Path) -> bool:
    try:
        ours, theirs = read_manifest(left), read_manifest(right)
    except ManifestError:
        return False
    return ours is not None and theirs is not None and ours.files == theirs.files
