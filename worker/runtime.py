"""One ONNX Runtime session per model version: providers, threads, signature, warm-up."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.config import ModelConfig
from worker.tensors import ONNX_TO_KSERVE, TensorSpec

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model file ONNX Runtime cannot serve; the message names the file and the reason."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), not the host's."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers that can run here, in order, always ending with CPU."""
    chosen = [p for p in requested if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def usable_providers() -> list[str]:
    """The providers that can actually start on this host.

    onnxruntime-gpu lists CUDA (and TensorRT) as available even on a host with
    no GPU or CUDA libraries; one probe session tells, so each model load does
    not retry (and re-log) the failure.
    """
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return available
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CUDAExecutionProvider"])
        cuda = "CUDAExecutionProvider" in session.get_providers()
    except Exception:
        cuda = False
    if cuda:
        return available
    log.warning("CUDAExecutionProvider is built in but cannot start on this host (no GPU or CUDA libraries); CPU only")
    return [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ONNX_TO_KSERVE.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which the KServe v2 protocol cannot carry")
    # Symbolic or unknown dims are dynamic (-1).
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel:
    """A loaded model version: its session, signature and the provider it actually got."""

    def __init__(
        self, name: str, version: int, path: Path, config: ModelConfig, available_providers: Sequence[str]
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.config = config
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads or usable_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning intra-op threads burn the cores the event loop (and, on small hosts, the
        # clients) need between runs; sleeping costs microseconds per run.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(config.execution_providers, available_providers)
        try:
            # ONNX Runtime falls back to the next provider itself when one (CUDA) cannot start.
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            self.inputs = [_spec(arg) for arg in self.session.get_inputs()]
            self.outputs = [_spec(arg) for arg in self.session.get_outputs()]
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != providers[0]:
            log.warning("model %s version %d asked for %s, got %s", name, version, providers[0], self.provider)
        self.output_names = [spec.name for spec in self.outputs]
        self.batchable = (
            config.max_batch_size > 0 and bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        )
        self.max_batch_size = config.max_batch_size if self.batchable else 0

    @property
    def device(self) -> str:
        return "cuda:0" if self.provider == "CUDAExecutionProvider" else "cpu"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def warm_up(self) -> None:
        """One run at load, so the first user request does not pay for lazy initialisation."""
        feeds = {}
        for spec in self.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        try:
            self.run(feeds)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: warm-up run failed: {exc}") from None
