"""Per-model configuration: `REPO/<model>/config.yaml`, every field optional.

Without a file, the model's ONNX signature and these defaults decide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A config.yaml that cannot be used; the message says which file and why."""


class VersionPolicy(BaseModel):
    """Which versions of a model to serve: `all`, the `latest` N, or `specific` ones."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["all", "latest", "specific"] = "all"
    latest: int = Field(default=1, ge=1)
    versions: list[int] = Field(default_factory=list)

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.policy == "latest":
            return ordered[-self.latest :]
        if self.policy == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 0 turns batching off; batching also needs a dynamic first dimension.
    max_batch_size: int = Field(default=64, ge=0)
    # With the greedy batcher batches form while ONNX Runtime runs, so waiting
    # for more requests only adds latency on an idle worker: 0 by default.
    max_queue_delay_us: int = Field(default=0, ge=0)
    # With no queue delay, a batch still waits for requests the worker is
    # receiving right now (its event loop has work queued), never on an idle
    # worker, and at most this long. Under load a microsecond model then runs
    # and answers in bursts instead of one request at a time; 0 turns it off.
    max_busy_wait_us: int = Field(default=2000, ge=0)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    # Requests waiting for a batch; beyond this, RESOURCE_EXHAUSTED at once.
    max_queue_size: int = Field(default=1024, ge=1)
    execution_providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    instance_count: int = Field(default=1, ge=1)
    # 0 (auto): the usable cores divided among the instances for a model whose one-sample run
    # takes >= 1 ms, else one thread (see OnnxModel.warm_up).
    intra_op_threads: int = Field(default=0, ge=0)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    # For a host (or cpuset) that runs one worker: several instances of a CPU model whose threads
    # cover every usable core (automatic threads do) each run on cores of their own, so the kernel
    # cannot move a run between cores mid-run, nor stack two instances on one core while another
    # waits (demo cnn, c=32, 2 cores: +7%). Off by default: workers sharing cores would all pin
    # their first instance to the same core (2 workers, cnn, c=2: 162 against 184 req/s).
    pin_instances: bool = False
    # Pad every batch to max_batch_size rows (copies of its last row) and cut the answers back, so
    # ONNX Runtime always sees one input shape. On CUDA a Conv rebuilds its cuDNN plan whenever the
    # shape differs from the previous run's (~55 ms on an H200), and a dynamic batcher changes it on
    # nearly every run; elsewhere the padding rows only cost compute. "auto": pad a model with
    # convolutions on CUDA.
    batch_padding: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ModelConfig:
        too_big = [size for size in self.preferred_batch_sizes if size < 1 or size > max(self.max_batch_size, 1)]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} must lie in 1..max_batch_size ({self.max_batch_size})")
        self.preferred_batch_sizes = sorted(set(self.preferred_batch_sizes))
        return self


def load_model_config(model_dir: Path) -> ModelConfig:
    """The model's config.yaml, or the defaults when there is none."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
