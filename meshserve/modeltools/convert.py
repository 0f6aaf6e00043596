"""`meshserve model convert`: scikit-learn, PyTorch and TensorFlow/Keras models to ONNX.

Every conversion runs the source model and the ONNX model on the same sample
inputs and fails when their outputs differ by more than the tolerance, so a
converted file is never trusted on faith. PyTorch and TensorFlow are optional
extras: when one is missing the command says which package to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.modeltools import sessions
from meshserve.modeltools.errors import ModelToolError

FRAMEWORKS = ("sklearn", "pytorch", "tensorflow")
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
_SUFFIXES = {
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".joblib": "sklearn",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".keras": "tensorflow",
    ".h5": "tensorflow",
}


@dataclass(frozen=True)
class ConversionReport:
    source: Path
    output: Path
    framework: str
    opset: int
    samples: int
    max_abs_diff: float
    tolerance: float
    inputs: list[str]
    outputs: list[str]


def detect_framework(source: Path) -> str:
    if source.is_dir() and (source / "saved_model.pb").exists():
        return "tensorflow"
    framework = _SUFFIXES.get(source.suffix.lower())
    if framework is None:
        raise ModelToolError(
            f"cannot tell the framework of {source.name} from its suffix; pass --framework ({', '.join(FRAMEWORKS)})"
        )
    return framework


def require_extra(framework: str) -> None:
    """Raises a ModelToolError naming the pip packages when an optional framework is not installed."""
    needed = {"pytorch": ["torch"], "tensorflow": ["tensorflow", "tf2onnx"]}.get(framework, [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelToolError(
            f"converting {framework} models needs {' and '.join(missing)}, which this environment lacks: "
            f"pip install {' '.join(missing)}"
        )


def convert(
    source: Path,
    output: Path,
    *,
    framework: str | None = None,
    sample: np.ndarray | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_name: str = "input",
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    samples: int = 32,
) -> ConversionReport:
    """Converts `source` to ONNX at `output`; the file appears only when the outputs agree within `tolerance`.

    `sample` (inputs with a batch axis) or `input_shape` (one sample's shape)
    tells the converter what the model takes; scikit-learn models know their
    feature count themselves.
    """
    if not source.exists():
        raise ModelToolError(f"{source} does not exist")
    framework = framework or detect_framework(source)
    if framework not in FRAMEWORKS:
        raise ModelToolError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    require_extra(framework)
    converter = {"sklearn": _SklearnConverter, "pytorch": _TorchConverter, "tensorflow": _KerasConverter}[framework]
    model = converter(source, input_name)
    inputs = sample if sample is not None else model.random_sample(input_shape, samples)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.ndim < 2 or len(inputs) == 0:
        raise ModelToolError(f"sample inputs need a batch axis and at least one sample; got shape {inputs.shape}")

    with _written_atomically(output) as partial:
        model.export(inputs, partial, opset)
        _check(partial)
        session = sessions.open_session(partial)
        onnx_outputs = session.run(None, {input_name: inputs})
        expected = model.predict(inputs)
        onnx_scores = onnx_outputs[model.compared_output(onnx_outputs)]
        diff = sessions.max_abs_diff(expected, onnx_scores)
        if not diff <= tolerance:  # NaN fails too
            raise ModelToolError(
                f"the ONNX model's outputs differ from the {framework} model's by up to {diff:.3g} "
                f"(tolerance {tolerance:g}); try another --opset, or raise --tolerance if this is expected"
            )
        names = ([arg.name for arg in session.get_inputs()], [arg.name for arg in session.get_outputs()])
    return ConversionReport(source, output, framework, opset, len(inputs), diff, tolerance, *names)


@contextlib.contextmanager
def _written_atomically(output: Path) -> Iterator[Path]:
    """Yields a temporary path beside `output` that replaces it only if the block succeeds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelToolError(f"the converted model fails onnx.checker: {exc}") from exc


class _SklearnConverter:
    def __init__(self, source: Path, input_name: str) -> None:
        import joblib

        try:
            self.model = joblib.load(source)
        except Exception as exc:  # unpickling can raise anything the pickled classes raise
            raise ModelToolError(
                f"cannot load {source} as a scikit-learn model saved with joblib/pickle: {exc}"
            ) from exc
        if not hasattr(self.model, "predict"):
            raise ModelToolError(f"{source} holds a {type(self.model).__name__}, not a fitted scikit-learn estimator")
        self.input_name = input_name
        from sklearn.base import is_classifier

        self.classifier = is_classifier(self.model) and hasattr(self.model, "predict_proba")

    def random_sample(self, input_shape: tuple[int, ...] | None, count: int) -> np.ndarray:
        features = getattr(self.model, "n_features_in_", None)
        shape = input_shape or ((int(features),) if features else None)
        if shape is None:
            raise ModelToolError("the model does not say how many features it takes; pass --input-shape or --sample")
        return np.random.default_rng(0).standard_normal((count, *shape)).astype(np.float32)

    def export(self, inputs: np.ndarray, path: Path, opset: int) -> None:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        options = {"zipmap": False} if self.classifier else None
        initial_types = [(self.input_name, FloatTensorType([None, *inputs.shape[1:]]))]
        try:
            onnx_model = to_onnx(self.model, initial_types=initial_types, target_opset=opset, options=options)
        except Exception as exc:  # skl2onnx raises RuntimeError/NotImplementedError/... for unsupported models
            raise ModelToolError(f"skl2onnx cannot convert this {type(self.model).__name__}: {exc}") from exc
        path.write_bytes(onnx_model.SerializeToString())

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        if self.classifier:
            return self.model.predict_proba(inputs)
        # skl2onnx regressors answer (N, targets), scikit-learn (N,) for a single target.
        return np.asarray(self.model.predict(inputs)).reshape(len(inputs), -1)

    def compared_output(self, onnx_outputs: list[np.ndarray]) -> int:
        # Classifiers: (label, probabilities); regressors: (variable,).
        return 1 if self.classifier else 0


class _TorchConverter:
    def __init__(self, source: Path, input_name: str) -> None:
        import torch

        self.input_name = input_name
        self.model = self._load(torch, source)
        self.model.eval()

    @staticmethod
    def _load(torch: Any, source: Path) -> Any:
        with contextlib.suppress(RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript loading is deprecated but still how scripted models ship
            return torch.jit.load(str(source), map_location="cpu")
        try:
            model = torch.load(str(source), map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling can raise anything the pickled classes raise
            raise ModelToolError(f"cannot load {source} with torch.load: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ModelToolError(
                f"{source} holds a {type(model).__name__}, not a module; save the whole model with "
                "torch.save(model, path) or torch.jit.save(torch.jit.script(model), path), not its state_dict"
            )
        return model

    def random_sample(self, input_shape: tuple[int, ...] | None, count: int) -> np.ndarray:
        if input_shape is None:
            raise ModelToolError("PyTorch models do not record their input shape; pass --input-shape or --sample")
        return np.random.default_rng(0).standard_normal((count, *input_shape)).astype(np.float32)

    def _forward(self, inputs: np.ndarray) -> list[Any]:
        import torch

        with torch.no_grad():
            result = self.model(torch.from_numpy(inputs))
        return list(result) if isinstance(result, tuple | list) else [result]

    def export(self, inputs: np.ndarray, path: Path, opset: int) -> None:
        import torch

        count = len(self._forward(inputs[:1]))
        output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
        dynamic_axes = {name: {0: "batch"} for name in [self.input_name, *output_names]}
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    self.model,
                    (torch.from_numpy(inputs),),
                    str(path),
                    input_names=[self.input_name],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types for unsupported operators
            raise ModelToolError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return self._forward(inputs)[0].numpy()

    def compared_output(self, onnx_outputs: list[np.ndarray]) -> int:
        return 0


class _KerasConverter:
    def __init__(self, source: Path, input_name: str) -> None:
        import tensorflow as tf

        self.input_name = input_name
        try:
            self.model = tf.keras.models.load_model(str(source))
        except Exception as exc:  # Keras raises many types for unreadable files
            raise ModelToolError(f"cannot load {source} with tf.keras.models.load_model: {exc}") from exc

    def random_sample(self, input_shape: tuple[int, ...] | None, count: int) -> np.ndarray:
        shape = input_shape or tuple(self.model.input_shape[1:])
        if any(dim is None for dim in shape):
            raise ModelToolError("the model's input shape is not fully known; pass --input-shape or --sample")
        return np.random.default_rng(0).standard_normal((count, *shape)).astype(np.float32)

    def export(self, inputs: np.ndarray, path: Path, opset: int) -> None:
        import tensorflow as tf
        import tf2onnx

        signature = [tf.TensorSpec((None, *inputs.shape[1:]), tf.float32, name=self.input_name)]
        try:
            tf2onnx.convert.from_keras(self.model, input_signature=signature, opset=opset, output_path=str(path))
        except Exception as exc:  # tf2onnx raises many types for unsupported operators
            raise ModelToolError(f"tf2onnx failed at opset {opset}: {exc}") from exc

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        result = self.model(inputs, training=False)
        first = result[0] if isinstance(result, tuple | list) else result
        return np.asarray(first)

    def compared_output(self, onnx_outputs: list[np.ndarray]) -> int:
        return 0
