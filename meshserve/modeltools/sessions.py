"""In-process ONNX Runtime helpers shared by the steps that compare models (convert, optimize, validate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshserve.modeltools.errors import ModelToolError
from worker.tensors import onnx_numpy_dtype

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None for a symbolic (dynamic) dimension

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape else None


def open_session(path: Path, optimization_level: str | None = None) -> ort.InferenceSession:
    """A CPU session on `path`; a model ONNX Runtime cannot load becomes a ModelToolError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimization_level == "disable":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types, all meaning "cannot load"
        raise ModelToolError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def _spec(arg: ort.NodeArg) -> TensorSpec:
    dtype = onnx_numpy_dtype(arg.type)
    if dtype is None:
        raise ModelToolError(f"tensor {arg.name!r} has type {arg.type}, which model tooling cannot feed or compare")
    shape = tuple(dim if isinstance(dim, int) and dim > 0 else None for dim in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


def input_specs(session: ort.InferenceSession) -> list[TensorSpec]:
    return [_spec(arg) for arg in session.get_inputs()]


def single_input(session: ort.InferenceSession, path: Path) -> TensorSpec:
    specs = input_specs(session)
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise ModelToolError(f"{path} has {len(specs)} inputs ({names}); this step supports single-input models")
    return specs[0]


def conform(inputs: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Casts `inputs` to the model's dtype and checks the per-sample shape against the model's."""
    expected = spec.shape[1:]
    got = inputs.shape[1:]
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got, strict=True)):
        shown = tuple("?" if dim is None else dim for dim in spec.shape)
        raise ModelToolError(f"input {spec.name!r} expects shape {shown} but the data has samples of shape {got}")
    return np.ascontiguousarray(inputs, dtype=spec.dtype)


def random_inputs(spec: TensorSpec, count: int, seed: int = 0) -> np.ndarray:
    """Random samples for a model without sample data; symbolic non-batch dimensions become 1."""
    rng = np.random.default_rng(seed)
    shape = (count, *(dim or 1 for dim in spec.shape[1:]))
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 10, shape).astype(spec.dtype)


def run_batched(session: ort.InferenceSession, name: str, inputs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Runs `inputs` through the model in batches; returns each output concatenated over all samples."""
    fixed = _spec(session.get_inputs()[0]).fixed_batch
    step = fixed or batch_size
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(inputs), step):
        batch = inputs[start : start + step]
        if fixed and len(batch) < fixed:
            break  # a model with a fixed batch size cannot take the ragged tail
        chunks.append(session.run(None, {name: batch}))
    if not chunks:
        raise ModelToolError(f"no complete batch of {step} samples in {len(inputs)}; give more data")
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]


def scores_index(outputs: list[np.ndarray]) -> int:
    """The output that holds class scores: the first floating-point output of rank 2 (else the first output)."""
    for index, output in enumerate(outputs):
        if np.issubdtype(output.dtype, np.floating) and output.ndim == 2:
            return index
    return 0


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    if expected.shape != actual.shape:
        raise ModelToolError(f"outputs differ in shape: {expected.shape} vs {actual.shape}")
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
