"""`meshserve model optimize`: ONNX Runtime offline graph optimization written to a new file.

The optimized graph is checked with onnx.checker and run side by side with
the original on the same inputs; it replaces nothing and is written only when
both checks pass. Level `all` adds layout transformations tuned to this
machine's CPU, so an `all` file belongs on hosts like the one that made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.modeltools import sessions
from meshserve.modeltools.errors import ModelToolError

LEVELS = ("basic", "extended", "all")
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OptimizationReport:
    source: Path
    output: Path
    level: str
    size_before: int
    size_after: int
    nodes_before: int
    nodes_after: int
    max_abs_diff: float
    tolerance: float


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def optimize(
    source: Path,
    output: Path,
    *,
    level: str = "extended",
    sample: np.ndarray | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    samples: int = 32,
) -> OptimizationReport:
    import onnx
    import onnxruntime as ort

    if level not in LEVELS:
        raise ModelToolError(f"unknown optimization level {level!r}; choose one of {', '.join(LEVELS)}")
    if not source.is_file():
        raise ModelToolError(f"{source} does not exist")
    if output.resolve() == source.resolve():
        raise ModelToolError("write the optimized model to a new file (-o), not over its source")
    reference = sessions.open_session(source, optimization_level="disable")
    spec = sessions.single_input(reference, source)
    inputs = sessions.conform(sample, spec) if sample is not None else sessions.random_inputs(spec, samples)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        options.optimized_model_filepath = str(partial)
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise ModelToolError(f"ONNX Runtime cannot optimize {source}: {exc}") from exc
        try:
            onnx.checker.check_model(str(partial))
        except onnx.checker.ValidationError as exc:
            raise ModelToolError(f"the optimized model fails onnx.checker ({exc}); try a lower --level") from exc
        optimized = sessions.open_session(partial)
        expected = sessions.run_batched(reference, spec.name, inputs, len(inputs))
        actual = sessions.run_batched(optimized, spec.name, inputs, len(inputs))
        diff = max(sessions.max_abs_diff(e, a) for e, a in zip(expected, actual, strict=True))
        if not diff <= tolerance:
            raise ModelToolError(
                f"optimized outputs differ from the original's by up to {diff:.3g} (tolerance {tolerance:g}); "
                "try a lower --level"
            )
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return OptimizationReport(
        source,
        output,
        level,
        source.stat().st_size,
        output.stat().st_size,
        _node_count(source),
        _node_count(output),
        diff,
        tolerance,
    )
