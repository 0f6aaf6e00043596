"""Model repositories for benchmark peers that differ from the worker's defaults."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml


def without_busy_wait(source: Path, destination: Path, models: Iterable[str]) -> Path:
    """A copy of `models` from `source` whose config.yaml files say `max_busy_wait_us: 0`."""
    for model in models:
        shutil.copytree(source / model, destination / model)
        config_path = destination / model / "config.yaml"
        config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
        config["max_busy_wait_us"] = 0
        config_path.write_text(yaml.safe_dump(config))
    return destination
