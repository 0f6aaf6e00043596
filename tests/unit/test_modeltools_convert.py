"""`meshserve model convert`: scikit-learn and PyTorch models to ONNX, each checked against its source."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.modeltools.convert import convert, require_extra
from meshserve.modeltools.errors import ModelToolError

DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
DIGITS_X = DIGITS_X.astype(np.float32)


def run_onnx(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})


@pytest.fixture(scope="module")
def sklearn_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(DIGITS_X, DIGITS_Y)
    path = tmp_path_factory.mktemp("sk") / "digits.joblib"
    joblib.dump(model, path)
    return path, model


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(torch.relu(self.conv(x)).flatten(1)), dim=-1)


def test_sklearn_classifier_matches_its_source(sklearn_classifier: tuple[Path, object], tmp_path: Path) -> None:
    source, model = sklearn_classifier
    report = convert(source, tmp_path / "digits.onnx", sample=DIGITS_X[:100])
    assert report.framework == "sklearn"
    assert report.outputs == ["label", "probabilities"]
    assert report.max_abs_diff < 1e-4
    # Independently of the tool's own check: labels and probabilities agree on all of the data.
    label, probabilities = run_onnx(tmp_path / "digits.onnx", DIGITS_X)
    np.testing.assert_array_equal(label, model.predict(DIGITS_X))  # type: ignore[attr-defined]
    np.testing.assert_allclose(probabilities, model.predict_proba(DIGITS_X), atol=1e-4)  # type: ignore[attr-defined]


def test_sklearn_regressor_without_sample_uses_its_feature_count(tmp_path: Path) -> None:
    model = Ridge().fit(DIGITS_X, DIGITS_Y.astype(np.float32))
    joblib.dump(model, tmp_path / "ridge.pkl")
    report = convert(tmp_path / "ridge.pkl", tmp_path / "ridge.onnx")
    assert report.samples == 32
    (prediction,) = run_onnx(tmp_path / "ridge.onnx", DIGITS_X[:50])
    np.testing.assert_allclose(prediction.ravel(), model.predict(DIGITS_X[:50]), atol=1e-3)


def test_pytorch_module_exports_with_a_dynamic_batch_axis(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SmallNet().eval()
    torch.save(net, tmp_path / "net.pt")
    report = convert(tmp_path / "net.pt", tmp_path / "net.onnx", input_shape=(1, 8, 8), opset=16)
    assert (report.framework, report.opset) == ("pytorch", 16)
    assert report.max_abs_diff < 1e-5
    import onnx

    model = onnx.load(str(tmp_path / "net.onnx"))
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 16
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # The exported graph takes batch sizes other than the one it was traced with.
    for batch in (1, 7):
        x = DIGITS_X[:batch].reshape(batch, 1, 8, 8) / 16
        (onnx_out,) = run_onnx(tmp_path / "net.onnx", x)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(onnx_out, expected, atol=1e-5)


def test_torchscript_module_converts(tmp_path: Path) -> None:
    torch.manual_seed(1)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh()).eval())
    scripted.save(str(tmp_path / "scripted.pt"))
    report = convert(tmp_path / "scripted.pt", tmp_path / "scripted.onnx", sample=DIGITS_X[:20])
    assert report.max_abs_diff < 1e-5
    (out,) = run_onnx(tmp_path / "scripted.onnx", DIGITS_X[:3])
    with torch.no_grad():
        np.testing.assert_allclose(out, scripted(torch.from_numpy(DIGITS_X[:3])).numpy(), atol=1e-5)


def test_state_dict_is_refused_with_what_to_save_instead(tmp_path: Path) -> None:
    torch.save(SmallNet().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelToolError, match="save the whole model"):
        convert(tmp_path / "weights.pt", tmp_path / "out.onnx", input_shape=(1, 8, 8))
    assert not (tmp_path / "out.onnx").exists()


def test_pytorch_needs_an_input_shape(tmp_path: Path) -> None:
    torch.save(SmallNet(), tmp_path / "net.pt")
    with pytest.raises(ModelToolError, match="--input-shape"):
        convert(tmp_path / "net.pt", tmp_path / "net.onnx")


def test_missing_tensorflow_extra_is_named() -> None:
    with pytest.raises(ModelToolError, match=r"pip install .*tf2onnx"):
        require_extra("tensorflow")


def test_unknown_suffix_asks_for_framework(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelToolError, match="--framework"):
        convert(tmp_path / "model.bin", tmp_path / "out.onnx")


def test_cli_convert_prints_the_difference_and_fails_cleanly(
    sklearn_classifier: tuple[Path, object], tmp_path: Path
) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["model", "convert", str(sklearn_classifier[0]), "-o", str(tmp_path / "m.onnx")])
    assert ok.exit_code == 0, ok.output
    assert "max abs diff" in ok.output
    assert (tmp_path / "m.onnx").is_file()
    bad = runner.invoke(app, ["model", "convert", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 1
    assert "does not exist" in bad.output
    assert "Traceback" not in bad.output


def test_difference_over_tolerance_fails_and_writes_nothing(
    sklearn_classifier: tuple[Path, object], tmp_path: Path
) -> None:
    # float64 scikit-learn vs float32 ONNX never agree to the last bit: a zero tolerance must fail.
    with pytest.raises(ModelToolError, match=r"differ from the sklearn model's by up to .*tolerance 0"):
        convert(sklearn_classifier[0], tmp_path / "strict.onnx", sample=DIGITS_X[:100], tolerance=0.0)
    assert list(tmp_path.iterdir()) == []
