"""`meshserve model quantize` on the demo digits model: every mode validates; broken calibration is caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.modeltools import datasets
from meshserve.modeltools.errors import ModelToolError
from meshserve.modeltools.quantize import quantize
from meshserve.modeltools.validate import validate


@pytest.fixture(scope="module")
def digits_v1(demo_repository: Path) -> Path:
    return demo_repository / "digits" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def digits_data() -> datasets.Dataset:
    return datasets.digits()


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize(
    ("mode", "method", "expected_op"),
    [
        ("dynamic", "minmax", "DynamicQuantizeLinear"),
        ("static", "minmax", "QuantizeLinear"),
        ("static", "entropy", "QuantizeLinear"),
        ("static", "percentile", "QuantizeLinear"),
    ],
)
def test_int8_modes_are_smaller_and_pass_validate(
    mode: str, method: str, expected_op: str, digits_v1: Path, digits_data: datasets.Dataset, tmp_path: Path
) -> None:
    out = tmp_path / f"{mode}-{method}.onnx"
    steps: list[tuple[int, int]] = []
    report = quantize(
        digits_v1,
        out,
        mode=mode,
        calibration=digits_data.inputs[:256],
        method=method,
        progress=lambda done, total: steps.append((done, total)),
    )
    assert expected_op in op_types(out)
    assert report.size_after < report.size_before * 0.6
    if mode == "static":
        assert report.calibration_samples == 256
        assert steps[-1] == (8, 8)  # 256 samples in batches of 32, reported as they are fed
    result = validate(out, digits_v1, digits_data, latency_runs=3)
    assert result.passed
    assert result.accuracy_drop is not None and result.accuracy_drop <= 0.01
    assert result.candidate.size_bytes < result.reference.size_bytes
    assert set(result.candidate.latency_ms) == {1, 32}


def test_fp16_keeps_float32_io(digits_v1: Path, digits_data: datasets.Dataset, tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    quantize(digits_v1, out, mode="fp16")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert validate(out, digits_v1, digits_data, latency_runs=1).passed


def test_constant_calibration_is_caught_by_validate(
    digits_v1: Path, digits_data: datasets.Dataset, tmp_path: Path
) -> None:
    # All-white "images": every activation range collapses, and the int8 model answers badly.
    broken = tmp_path / "broken.onnx"
    quantize(digits_v1, broken, mode="static", calibration=np.full((64, 64), 16.0, dtype=np.float32))
    result = validate(broken, digits_v1, digits_data, latency_runs=1)
    assert not result.passed
    assert result.accuracy_drop is not None and result.accuracy_drop > 0.01


def test_cli_validate_exits_nonzero_for_broken_calibration(
    digits_v1: Path, digits_data: datasets.Dataset, tmp_path: Path
) -> None:
    np.save(tmp_path / "constant.npy", np.zeros((64, 64), dtype=np.float32))  # blank images
    runner = CliRunner()
    calibration = ["--mode", "static", "--calibration", str(tmp_path / "constant.npy")]
    made = runner.invoke(app, ["model", "quantize", str(digits_v1), "-o", str(tmp_path / "q.onnx"), *calibration])
    assert made.exit_code == 0, made.output
    checked = runner.invoke(
        app, ["model", "validate", str(tmp_path / "q.onnx"), "--reference", str(digits_v1), "--data", "digits"]
    )
    assert checked.exit_code == 1, checked.output
    assert "FAIL" in checked.output and "accuracy" in checked.output


def test_static_without_calibration_says_what_to_pass(digits_v1: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelToolError, match="--calibration"):
        quantize(digits_v1, tmp_path / "q.onnx", mode="static")
    assert not (tmp_path / "q.onnx").exists()


def test_graph_without_weights_to_quantize_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(ModelToolError, match="would only make it larger"):
        quantize(tmp_path / "relu.onnx", tmp_path / "q.onnx", mode="dynamic")


def test_calibration_shape_mismatch_names_the_tensor(digits_v1: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelToolError, match="'input' expects shape"):
        quantize(digits_v1, tmp_path / "q.onnx", mode="static", calibration=np.zeros((8, 10), np.float32))
