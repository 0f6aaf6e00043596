"""`meshserve model publish`, `package` and `unpack`: atomic versions, SHA-256 manifests, tamper refusal."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.modeltools.errors import ModelToolError
from meshserve.modeltools.package import package, unpack
from meshserve.modeltools.publish import publish
from worker.manifest import ManifestError, read_manifest, sha256_file, verify_version_dir


@pytest.fixture
def model_file(demo_repository: Path) -> Path:
    return demo_repository / "digits" / "1" / "model.onnx"


def test_publish_writes_the_next_version_with_a_manifest(model_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = publish(model_file, repo, "digits")
    second = publish(model_file, repo, "digits")
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in (repo / "digits").iterdir() if not p.name.startswith(".")) == ["1", "2"]
    manifest = read_manifest(repo / "digits" / "2")
    assert manifest is not None
    assert manifest.files == {"model.onnx": sha256_file(model_file)}
    body = json.loads((repo / "digits" / "2" / "manifest.json").read_text())
    assert set(body) == {"files", "created", "meshserve_version"}
    assert verify_version_dir(repo / "digits" / "2") == manifest


def test_tampered_bytes_are_refused_with_the_file_named(model_file: Path, tmp_path: Path) -> None:
    report = publish(model_file, tmp_path, "digits")
    target = report.path / "model.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx does not match manifest\.json"):
        verify_version_dir(report.path)
    target.unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_version_dir(report.path)


def test_a_version_without_manifest_is_accepted_as_is(model_file: Path) -> None:
    assert verify_version_dir(model_file.parent) is None


def test_concurrent_scanner_never_sees_a_partial_version(model_file: Path, tmp_path: Path) -> None:
    """A thread lists the model directory as fast as it can while versions are published; every version
    directory it ever sees is already complete and verifies against its manifest."""
    repo = tmp_path / "repo"
    (repo / "digits").mkdir(parents=True)
    stop = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []

    def scan() -> None:
        while not stop.is_set():
            for child in (repo / "digits").iterdir():
                if child.name.isdigit() and child.name not in seen:
                    try:
                        if verify_version_dir(child) is None:
                            problems.append(f"{child.name}: no manifest")
                    except (ManifestError, OSError) as exc:
                        problems.append(f"{child.name}: {exc}")
                    seen.add(child.name)

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        with ThreadPoolExecutor(4) as pool:  # concurrent publishers must also get distinct numbers
            versions = sorted(pool.map(lambda _: publish(model_file, repo, "digits").version, range(12)))
    finally:
        stop.set()
        scanner.join()
    assert versions == list(range(1, 13))
    assert problems == []
    assert seen == {str(v) for v in versions}
    assert not [p for p in (repo / "digits").iterdir() if p.name.startswith(".staging")]


def test_publish_refuses_what_the_worker_could_not_serve(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelToolError, match="cannot load"):
        publish(tmp_path / "junk.onnx", tmp_path / "repo", "digits")
    (tmp_path / "bad.yaml").write_text("max_batch_size: -3\n")
    with pytest.raises(ModelToolError, match="not a valid model config"):
        publish(model_file, tmp_path / "repo", "digits", config=tmp_path / "bad.yaml")
    with pytest.raises(ModelToolError, match="model name"):
        publish(model_file, tmp_path / "repo", "../escape")
    assert not list((tmp_path / "repo").glob("*/[0-9]*"))


def test_publish_installs_a_valid_config(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("max_batch_size: 8\n")
    report = publish(model_file, tmp_path / "repo", "digits", config=tmp_path / "config.yaml")
    assert report.config_written
    assert (tmp_path / "repo" / "digits" / "config.yaml").read_text() == "max_batch_size: 8\n"


def test_package_and_unpack_move_versions_between_repositories(model_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "a"
    publish(model_file, source, "digits")
    publish(model_file, source, "digits")
    (source / "digits" / "config.yaml").write_text("max_batch_size: 16\n")
    archive = tmp_path / "digits.tar.gz"
    assert package("digits", source, archive).versions == [1, 2]

    target = tmp_path / "b"
    report = unpack(archive, target)
    assert report.installed == {1: 1, 2: 2}
    assert report.config == "installed"
    for version in (1, 2):
        assert verify_version_dir(target / "digits" / str(version)) is not None
    again = unpack(archive, target)
    assert again.skipped == [1, 2] and again.installed == {}
    renumbered = unpack(archive, target, renumber=True)
    assert renumbered.installed == {1: 3, 2: 4}


def test_package_adds_manifests_to_versions_published_without(demo_repository: Path, tmp_path: Path) -> None:
    archive = tmp_path / "demo.tar.gz"
    package("digits", demo_repository, archive)
    with tarfile.open(archive) as tar:
        assert "digits/1/manifest.json" in tar.getnames()
    assert unpack(archive, tmp_path / "repo").installed == {1: 1}


def test_unpack_refuses_a_tampered_archive_and_installs_nothing(model_file: Path, tmp_path: Path) -> None:
    publish(model_file, tmp_path / "a", "digits")
    good = tmp_path / "good.tar.gz"
    package("digits", tmp_path / "a", good)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(good) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith("model.onnx"):
                data = data[:-10] + b"0123456789"
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ModelToolError, match="damaged, nothing was installed"):
        unpack(bad, tmp_path / "b")
    assert not list((tmp_path / "b" / "digits").glob("[0-9]*"))


def test_unpack_refuses_paths_that_leave_the_repository(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ModelToolError, match="not a plain file inside the model"):
        unpack(evil, tmp_path / "repo")
    assert not (tmp_path / "outside.txt").exists()


def test_unpack_conflict_suggests_renumber(model_file: Path, tmp_path: Path, demo_repository: Path) -> None:
    publish(model_file, tmp_path / "a", "digits")
    archive = tmp_path / "a.tar.gz"
    package("digits", tmp_path / "a", archive)
    other = demo_repository / "mlp784" / "1" / "model.onnx"
    publish(other, tmp_path / "b", "digits")
    with pytest.raises(ModelToolError, match="--renumber"):
        unpack(archive, tmp_path / "b")


def test_cli_publish_package_unpack(model_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    published = runner.invoke(
        app, ["model", "publish", str(model_file), "--repository", str(tmp_path / "r"), "--name", "d"]
    )
    assert published.exit_code == 0, published.output
    assert "version" in published.output and "sha256" in published.output
    packed = runner.invoke(
        app, ["model", "package", "d", "--repository", str(tmp_path / "r"), "-o", str(tmp_path / "d.tgz")]
    )
    assert packed.exit_code == 0, packed.output
    unpacked = runner.invoke(app, ["model", "unpack", str(tmp_path / "d.tgz"), "--repository", str(tmp_path / "s")])
    assert unpacked.exit_code == 0, unpacked.output
    assert (tmp_path / "s" / "d" / "1" / "manifest.json").is_file()
    missing = runner.invoke(app, ["model", "package", "nope", "--repository", str(tmp_path / "r"), "-o", "x.tgz"])
    assert missing.exit_code == 1 and "no versions" in missing.output
