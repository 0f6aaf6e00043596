"""The Docker image's build step, rehearsed without a Docker engine: the files
the Dockerfile copies (and .dockerignore lets through) build the meshserve
wheel with every package the project declares and the `meshserve` command."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.harness import REPO_ROOT


def copied_sources() -> list[str]:
    """Sources of the build stage's `COPY` lines (not `COPY --from=...`)."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    build_stage = dockerfile.split(" AS build", 1)[1].split("\nFROM ", 1)[0]
    sources: list[str] = []
    for line in build_stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    return sources


def let_through_dockerignore(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    included = True
    for pattern in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or pattern == "**":
            included = negate
    return included


def test_the_build_stage_copies_every_declared_package() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}

    sources = copied_sources()

    assert declared <= set(sources), f"packages not copied into the image: {declared - set(sources)}"
    assert {"pyproject.toml", "README.md"} <= set(sources)
    for source in sources:
        assert let_through_dockerignore(source), f".dockerignore drops {source}, which the Dockerfile copies"
    for kept_out in (".venv", "tests", "bench", ".git", "models"):
        assert not let_through_dockerignore(kept_out), kept_out


def test_the_copied_files_build_the_wheel_with_the_cli(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_sources():
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.onnx"))
        else:
            shutil.copy2(origin, context / source)

    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("meshserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    top_level = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert {"protos", "worker", "registry", "loadbalancer", "gateway", "meshserve"} <= top_level
    assert any(re.fullmatch(r"protos/.*\.proto", name) for name in names)
    assert not any(name.endswith(".onnx") for name in names), "no model may be baked into the image"
    assert re.search(r"^meshserve = meshserve\.cli:main$", entry_points, re.MULTILINE)
