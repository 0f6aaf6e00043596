"""ONNX Runtime sessions as the worker opens them: native logging stays off stderr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker_models import add_model
from worker.config import ModelConfig
from worker.runtime import OnnxModel, usable_providers


def test_provider_probe_and_model_load_print_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The C++ logger writes coloured plain text straight to fd 2, which breaks one-JSON-object-per-line logs
    (onnxruntime-gpu on a host without CUDA logs an error and a warning when the CUDA provider fails to load)."""
    providers = usable_providers()  # with onnxruntime-gpu on a host without CUDA, tries to load CUDA and fails
    assert "CPUExecutionProvider" in providers
    path = tmp_path / "model.onnx"
    path.write_bytes(add_model(1.0).SerializeToString())
    model = OnnxModel("m", 1, path, ModelConfig(), providers)
    model.warm_up()
    (out,) = model.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(out, np.ones((1, 4), np.float32))
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""
