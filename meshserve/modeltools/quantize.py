"""`meshserve model quantize`: ONNX Runtime dynamic int8, static QDQ with calibration, and FP16 conversion.

- dynamic: int8 weights, activations quantized on the fly; no data needed.
- static: int8 weights and activations in QDQ format, activation ranges
  calibrated (MinMax, Entropy or Percentile) on representative inputs. Bad
  calibration data gives a model that loads and runs but answers wrongly,
  which is why `validate` exists.
- fp16: float32 weights and activations to float16, for GPU targets; inputs
  and outputs stay float32 by default so clients need not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.modeltools import sessions
from meshserve.modeltools.errors import ModelToolError

MODES = ("dynamic", "static", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32

Progress = Callable[[int, int], None]
# Operators whose weights ONNX Runtime's int8 quantizers rewrite; a graph without any gains nothing.
QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "LSTM", "GRU"})


@dataclass(frozen=True)
class QuantizationReport:
    source: Path
    output: Path
    mode: str
    method: str | None
    calibration_samples: int
    size_before: int
    size_after: int


def quantize(
    source: Path,
    output: Path,
    *,
    mode: str = "dynamic",
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    per_channel: bool = False,
    keep_io_types: bool = True,
    progress: Progress | None = None,
) -> QuantizationReport:
    """Writes a quantized copy of `source` to `output`; `calibration` (inputs with a batch axis) is for static."""
    if mode not in MODES:
        raise ModelToolError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if method not in CALIBRATION_METHODS:
        raise ModelToolError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not source.is_file():
        raise ModelToolError(f"{source} does not exist")
    if output.resolve() == source.resolve():
        raise ModelToolError("write the quantized model to a new file (-o), not over its source")
    if mode != "fp16":
        _require_quantizable(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    samples = 0
    try:
        if mode == "dynamic":
            _dynamic(source, partial, per_channel)
        elif mode == "static":
            if calibration is None or len(calibration) == 0:
                raise ModelToolError("static quantization needs calibration data: pass --calibration FILE or digits")
            samples = len(calibration)
            _static(source, partial, calibration, method, per_channel, progress)
        else:
            _fp16(source, partial, keep_io_types)
        sessions.open_session(partial)  # a model the runtime cannot load must not be written
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return QuantizationReport(
        source,
        output,
        mode,
        method if mode == "static" else None,
        samples,
        source.stat().st_size,
        output.stat().st_size,
    )


def _require_quantizable(source: Path) -> None:
    import onnx

    ops = {node.op_type for node in onnx.load(str(source), load_external_data=False).graph.node}
    if not ops & QUANTIZABLE_OPS:
        raise ModelToolError(
            f"{source} has no {'/'.join(sorted(QUANTIZABLE_OPS))} nodes for int8 quantization to work on "
            f"(its operators: {', '.join(sorted(ops))}); quantization would only make it larger"
        )


def _dynamic(source: Path, output: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(source), str(output), weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as exc:  # the quantizer raises many types for graphs it cannot handle
        raise ModelToolError(f"dynamic quantization of {source} failed: {exc}") from exc


def _static(
    source: Path, output: Path, calibration: np.ndarray, method: str, per_channel: bool, progress: Progress | None
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reference = sessions.open_session(source)
    spec = sessions.single_input(reference, source)
    inputs = sessions.conform(calibration, spec)
    batch = spec.fixed_batch or CALIBRATION_BATCH
    reader = _ArrayReader(spec.name, inputs, batch, progress)
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    try:
        quantize_static(
            str(source),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=calibrate_method,
        )
    except ModelToolError:
        raise
    except Exception as exc:  # the quantizer raises many types for graphs it cannot handle
        raise ModelToolError(f"static quantization of {source} failed: {exc}") from exc


def _fp16(source: Path, output: Path, keep_io_types: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    try:
        converted = convert_float_to_float16(model, keep_io_types=keep_io_types)
    except Exception as exc:  # the converter raises many types for graphs it cannot handle
        raise ModelToolError(f"FP16 conversion of {source} failed: {exc}") from exc
    onnx.save(converted, str(output))


class _ArrayReader:
    """ONNX Runtime's CalibrationDataReader protocol over an in-memory array, in batches."""

    def __init__(self, name: str, inputs: np.ndarray, batch: int, progress: Progress | None) -> None:
        self._name = name
        self._batches = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
        if len(self._batches[-1]) < batch and len(self._batches) > 1:
            self._batches.pop()  # a fixed-batch model cannot take the ragged tail; others lose little
        self._next = 0
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        if self._progress:
            self._progress(self._next, len(self._batches))
        return {self._name: batch}

    def rewind(self) -> None:
        self._next = 0
