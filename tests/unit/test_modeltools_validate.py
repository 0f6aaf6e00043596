"""`meshserve model validate` and `optimize`: side-by-side numbers, the accuracy gate, data formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.modeltools import datasets
from meshserve.modeltools.errors import ModelToolError
from meshserve.modeltools.optimize import optimize
from meshserve.modeltools.validate import validate


def linear_model(path: Path, weights: np.ndarray) -> Path:
    """input [batch, 4] -> MatMul -> scores [batch, classes]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["scores"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    weights = np.eye(4, 3)
    reference = linear_model(tmp_path / "ref.onnx", weights)
    # Swaps classes 0 and 1: every sample whose top-1 is 0 or 1 now disagrees.
    candidate = linear_model(tmp_path / "cand.onnx", weights[:, [1, 0, 2]])
    x = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 3, 0]], dtype=np.float32)
    return reference, candidate, x


def test_identical_models_agree_fully(pair: tuple[Path, Path, np.ndarray]) -> None:
    reference, _, x = pair
    report = validate(reference, reference, datasets.Dataset(x, np.array([0, 1, 2, 2]), "test"), latency_runs=2)
    assert report.top1_agreement == 1.0
    assert report.reference.accuracy == report.candidate.accuracy == 1.0
    assert report.max_abs_diff == report.mean_abs_diff == 0.0
    assert report.passed


def test_accuracy_against_labels(pair: tuple[Path, Path, np.ndarray]) -> None:
    reference, candidate, x = pair
    report = validate(candidate, reference, datasets.Dataset(x, np.array([0, 1, 2, 2]), "test"), latency_runs=1)
    assert report.top1_agreement == 0.5
    assert (report.reference.accuracy, report.candidate.accuracy) == (1.0, 0.5)
    assert report.accuracy_drop == pytest.approx(0.5)
    assert report.max_abs_diff == 3.0
    assert not report.passed


def test_without_labels_the_reference_is_the_truth(pair: tuple[Path, Path, np.ndarray]) -> None:
    reference, candidate, x = pair
    report = validate(candidate, reference, datasets.Dataset(x, None, "test"), latency_runs=1)
    assert report.reference.accuracy is None
    assert report.accuracy_drop == pytest.approx(0.5)
    assert validate(candidate, reference, datasets.Dataset(x, None, "t"), max_accuracy_drop=0.6).passed


def test_cli_reads_npz_and_gates_on_max_accuracy_drop(pair: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    reference, candidate, x = pair
    np.savez(tmp_path / "data.npz", x=x, y=np.array([0, 1, 2, 2]))
    runner = CliRunner()
    args = ["model", "validate", str(candidate), "--reference", str(reference), "--data", str(tmp_path / "data.npz")]
    failed = runner.invoke(app, [*args, "--latency-runs", "1"])
    assert failed.exit_code == 1
    for row in ("accuracy", "top-1 agreement", "max abs diff", "mean abs diff", "size", "latency batch 1"):
        assert row in failed.output
    assert "latency batch 32" in failed.output
    passed = runner.invoke(app, [*args, "--latency-runs", "1", "--max-accuracy-drop", "0.5"])
    assert passed.exit_code == 0, passed.output
    assert "PASS" in passed.output


def test_data_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelToolError, match="not found"):
        datasets.load(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ModelToolError, match="name the inputs 'x'"):
        datasets.load(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "ragged.npz", x=np.zeros((3, 4)), y=np.zeros(2))
    with pytest.raises(ModelToolError, match="must match"):
        datasets.load(str(tmp_path / "ragged.npz"))


def test_wrong_feature_count_is_reported(pair: tuple[Path, Path, np.ndarray]) -> None:
    reference, candidate, _ = pair
    with pytest.raises(ModelToolError, match="expects shape"):
        validate(candidate, reference, datasets.Dataset(np.zeros((2, 5), np.float32), None, "t"))


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_optimize_levels_keep_outputs(level: str, demo_repository: Path, tmp_path: Path) -> None:
    source = demo_repository / "digits" / "1" / "model.onnx"
    out = tmp_path / f"{level}.onnx"
    report = optimize(source, out, level=level, sample=datasets.digits().inputs[:64])
    onnx.checker.check_model(str(out))
    assert report.max_abs_diff <= 1e-4
    assert report.nodes_after <= report.nodes_before
    assert validate(out, source, datasets.digits(), latency_runs=1).top1_agreement == 1.0


def test_optimize_refuses_to_overwrite_its_source(demo_repository: Path) -> None:
    source = demo_repository / "digits" / "1" / "model.onnx"
    with pytest.raises(ModelToolError, match="new file"):
        optimize(source, source)
