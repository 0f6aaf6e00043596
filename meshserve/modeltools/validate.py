"""`meshserve model validate`: a candidate model side by side with its reference on the same data.

Reports top-1 agreement, accuracy (when labels are given), max/mean absolute
difference of the score outputs, file size, and in-process latency at batch 1
and 32. The gate is the accuracy drop: against the labels when there are
any, else against the reference's own predictions (1 - top-1 agreement).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshserve.modeltools import sessions
from meshserve.modeltools.datasets import Dataset
from meshserve.modeltools.errors import ModelToolError

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_MAX_ACCURACY_DROP = 0.01
LATENCY_BATCHES = (1, 32)


@dataclass(frozen=True)
class ModelStats:
    path: Path
    size_bytes: int
    accuracy: float | None
    latency_ms: dict[int, float | None]  # batch size -> median milliseconds per run


@dataclass(frozen=True)
class ValidationReport:
    reference: ModelStats
    candidate: ModelStats
    samples: int
    top1_agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    accuracy_drop: float | None
    max_accuracy_drop: float

    @property
    def passed(self) -> bool:
        return self.accuracy_drop is None or self.accuracy_drop <= self.max_accuracy_drop


def validate(
    candidate: Path,
    reference: Path,
    data: Dataset,
    *,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    latency_runs: int = 20,
) -> ValidationReport:
    for path in (candidate, reference):
        if not path.is_file():
            raise ModelToolError(f"{path} does not exist")
    if len(data) == 0:
        raise ModelToolError(f"{data.source} holds no samples")
    ref_session = sessions.open_session(reference)
    cand_session = sessions.open_session(candidate)
    ref_spec = sessions.single_input(ref_session, reference)
    cand_spec = sessions.single_input(cand_session, candidate)
    ref_inputs = sessions.conform(data.inputs, ref_spec)
    cand_inputs = sessions.conform(data.inputs, cand_spec)

    ref_outputs = sessions.run_batched(ref_session, ref_spec.name, ref_inputs, 256)
    cand_outputs = sessions.run_batched(cand_session, cand_spec.name, cand_inputs, 256)
    if len(ref_outputs) != len(cand_outputs):
        raise ModelToolError(
            f"the models have {len(ref_outputs)} and {len(cand_outputs)} outputs; compare like with like"
        )
    index = sessions.scores_index(ref_outputs)
    ref_scores = ref_outputs[index].astype(np.float64)
    cand_scores = cand_outputs[index].astype(np.float64)
    if ref_scores.shape != cand_scores.shape:
        raise ModelToolError(f"score outputs differ in shape: {ref_scores.shape} vs {cand_scores.shape}")
    abs_diff = np.abs(ref_scores - cand_scores)
    max_abs = float(np.max(abs_diff)) if abs_diff.size else 0.0
    mean_abs = float(np.mean(abs_diff)) if abs_diff.size else 0.0

    agreement = ref_accuracy = cand_accuracy = drop = None
    if ref_scores.ndim == 2:
        ref_top1 = np.argmax(ref_scores, axis=1)
        cand_top1 = np.argmax(cand_scores, axis=1)
        agreement = float(np.mean(ref_top1 == cand_top1))
        # NaN scores are never a right answer, whatever argmax makes of them.
        cand_valid = np.all(np.isfinite(cand_scores), axis=1)
        labels = data.labels[: len(ref_top1)] if data.labels is not None else None
        if labels is not None:
            ref_accuracy = float(np.mean(ref_top1 == labels))
            cand_accuracy = float(np.mean((cand_top1 == labels) & cand_valid))
            drop = ref_accuracy - cand_accuracy
        else:
            drop = 1.0 - float(np.mean((cand_top1 == ref_top1) & cand_valid))
    if not np.all(np.isfinite(cand_scores)):
        max_abs = mean_abs = float("inf")

    return ValidationReport(
        reference=ModelStats(
            reference,
            reference.stat().st_size,
            ref_accuracy,
            _latencies(ref_session, ref_spec, ref_inputs, latency_runs),
        ),
        candidate=ModelStats(
            candidate,
            candidate.stat().st_size,
            cand_accuracy,
            _latencies(cand_session, cand_spec, cand_inputs, latency_runs),
        ),
        samples=len(ref_scores),
        top1_agreement=agreement,
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        accuracy_drop=drop,
        max_accuracy_drop=max_accuracy_drop,
    )


def _latencies(
    session: ort.InferenceSession, spec: sessions.TensorSpec, inputs: np.ndarray, runs: int
) -> dict[int, float | None]:
    fixed, name = spec.fixed_batch, spec.name
    result: dict[int, float | None] = {}
    for batch in LATENCY_BATCHES:
        if (fixed and fixed != batch) or len(inputs) == 0:
            result[batch] = None
            continue
        feed = {name: np.resize(inputs, (batch, *inputs.shape[1:])).astype(inputs.dtype)}
        session.run(None, feed)  # warm-up: first runs allocate
        timings = []
        for _ in range(max(runs, 1)):
            start = time.perf_counter()
            session.run(None, feed)
            timings.append((time.perf_counter() - start) * 1000.0)
        result[batch] = statistics.median(timings)
    return result
