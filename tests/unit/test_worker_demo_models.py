"""The demo repository: layout, signatures, determinism, the digits accuracy; and worker settings."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from meshserve.demo_models import build_cnn, build_mlp784
from meshserve.settings import load
from worker.settings import WorkerSettings

SIGNATURES = {
    "digits": ("input", ["batch", 64]),
    "mlp784": ("input", ["batch", 784]),
    "cnn": ("input", ["batch", 1, 64, 64]),
}


def test_demo_repository_layout_and_signatures(demo_repository: Path) -> None:
    for name, (input_name, _) in SIGNATURES.items():
        session = ort.InferenceSession(str(demo_repository / name / "1" / "model.onnx"))
        (model_input,) = session.get_inputs()
        assert model_input.name == input_name
        assert model_input.type == "tensor(float)"
        assert not isinstance(model_input.shape[0], int)  # dynamic batch dimension
        assert "probabilities" in [o.name for o in session.get_outputs()]
        x = np.zeros([3, *[d for d in model_input.shape[1:]]], np.float32)
        probabilities = session.run(["probabilities"], {input_name: x})[0]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_builders_are_deterministic() -> None:
    assert build_mlp784().SerializeToString() == build_mlp784().SerializeToString()
    assert build_cnn().SerializeToString() == build_cnn().SerializeToString()


def test_demo_models_command_prints_the_digits_accuracy(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshserve", "demo-models", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    accuracy = float(out.split("digits held-out accuracy: ")[1].split()[0])
    assert accuracy >= 0.95
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["cnn", "digits", "mlp784"]
    first = (tmp_path / "repo" / "digits" / "1" / "model.onnx").read_bytes()
    subprocess.run([sys.executable, "-m", "meshserve", "demo-models", str(tmp_path / "again")], check=True, timeout=120)
    assert (tmp_path / "again" / "digits" / "1" / "model.onnx").read_bytes() == first


def test_worker_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHSERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("MESHSERVE_INJECT_LATENCY_MS", "5")
    monkeypatch.setenv("MESHSERVE_DRAIN_GRACE", "7")
    settings = load(WorkerSettings, drain_grace=2.0, port=None)
    assert settings.model_repository == tmp_path
    assert settings.inject_latency_ms == 5
    assert settings.drain_grace == 2.0
    assert settings.port == 0 and settings.metrics_port == 0


def test_automatic_intra_op_threads_follow_the_models_cost(demo_repository: Path) -> None:
    """A sub-millisecond model keeps one ORT thread; the compute-bound CNN gets every usable core."""
    from worker.config import ModelConfig
    from worker.runtime import OnnxModel, usable_cores

    threads = {}
    for name in ("mlp784", "cnn"):
        model = OnnxModel(name, 1, demo_repository / name / "1" / "model.onnx", ModelConfig(), ["CPUExecutionProvider"])
        model.warm_up()
        threads[name] = model.intra_op_threads
    assert threads == {"mlp784": 1, "cnn": usable_cores()}
    pinned = OnnxModel(
        "cnn",
        1,
        demo_repository / "cnn" / "1" / "model.onnx",
        ModelConfig(intra_op_threads=3),
        ["CPUExecutionProvider"],
    )
    pinned.warm_up()
    assert pinned.intra_op_threads == 3  # an explicit setting is never second-guessed


def test_automatic_intra_op_threads_split_the_cores_among_instances(
    demo_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Instances run batches side by side: together they get the usable cores, never more (at least one each)."""
    from worker.config import ModelConfig
    from worker.runtime import OnnxModel, usable_cores

    if usable_cores() < 2:
        pytest.skip("automatic threads are decided only where more than one core is usable")
    path = demo_repository / "cnn" / "1" / "model.onnx"
    for instances in (2, usable_cores() + 1):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="worker.runtime"):
            model = OnnxModel("cnn", 1, path, ModelConfig(instance_count=instances), ["CPUExecutionProvider"])
            model.warm_up()
        threads = max(1, usable_cores() // instances)
        assert model.intra_op_threads == threads
        # The benchmark reads the per-instance thread count from this line.
        assert f"model cnn version 1: {threads} intra-op thread(s) x {instances} instance(s)" in caplog.text
    quick = OnnxModel(
        "mlp784",
        1,
        demo_repository / "mlp784" / "1" / "model.onnx",
        ModelConfig(instance_count=2),
        ["CPUExecutionProvider"],
    )
    quick.warm_up()
    assert quick.intra_op_threads == 1


def test_the_demo_cnn_runs_two_instances(demo_repository: Path) -> None:
    from worker.config import load_model_config

    config = load_model_config(demo_repository / "cnn")
    assert config.instance_count == 2 and config.intra_op_threads == 0  # automatic threads, split between the two
    assert config.max_batch_size == 32
