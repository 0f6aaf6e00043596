"""One ONNX Runtime session per model version: providers, threads, signature, warm-up."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from worker.config import ModelConfig
from worker.tensors import ONNX_TO_KSERVE, TensorSpec

log = logging.getLogger(__name__)

# With `intra_op_threads: 0` (auto), a model whose one-sample run takes at least this long gets
# the usable cores divided among its instances; a quicker one gets one thread.
AUTO_THREADS_THRESHOLD_S = 1e-3
AUTO_THREADS_PROBE_RUNS = 5
# A model whose largest batch runs within this is run on the event loop's thread: handing a run to
# the executor and back (two thread wake-ups and a self-pipe write) costs more than the run itself,
# and the loop spends far longer (~0.4 ms per request) receiving the requests of such a batch.
INLINE_RUN_LIMIT_S = 500e-6
# ONNX Runtime's own C++ logger writes coloured plain text to stderr, past the JSON log lines:
# errors only (3), and nothing below fatal (4) while probing for a provider that is expected to fail.
NATIVE_LOG_SEVERITY = 3
PROBE_LOG_SEVERITY = 4
NVIDIA_DRIVER_LIBRARY = "libcuda.so.1"
# sys.stdout is one per process: two redirects overlapping in two threads (two models loading at once) would
# each restore the other's buffer, and stdout would stay redirected for good.
_STDOUT_REDIRECT = threading.RLock()


class ModelLoadError(Exception):
    """A model file ONNX Runtime cannot serve; the message names the file and the reason."""


def instance_cores(index: int, threads: int, cores: Sequence[int]) -> set[int]:
    """The cores instance `index` of a model with `threads` intra-op threads per instance runs on: the
    next `threads` of `cores` in turn, so instances get disjoint sets while they fit and share evenly after."""
    return {cores[(index * threads + offset) % len(cores)] for offset in range(min(threads, len(cores)))}


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
    ort.set_default_logger_severity(NATIVE_LOG_SEVERITY)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return available
    cpu_only = [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if not nvidia_driver_present():
        # The CUDA image or meshserve[cuda] on a host without a GPU: not worth loading ~1.5 GB of CUDA libraries.
        log.info("no NVIDIA driver (%s) on this host: the models run on the CPU", NVIDIA_DRIVER_LIBRARY)
        return cpu_only
    preload_pip_cuda_libraries()
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = PROBE_LOG_SEVERITY
    ort.set_default_logger_severity(PROBE_LOG_SEVERITY)
    try:
        with printed_to_log(logging.INFO, "probing CUDAExecutionProvider"):
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CUDAExecutionProvider"])
        cuda = "CUDAExecutionProvider" in session.get_providers()
    except Exception:
        cuda = False
    finally:
        ort.set_default_logger_severity(NATIVE_LOG_SEVERITY)
    if cuda:
        return available
    log.warning(
        "CUDAExecutionProvider is built in but cannot start on this host (no GPU, or no CUDA %s and cuDNN 9 "
        "libraries: `pip install meshserve[cuda]` brings them); CPU only",
        getattr(ort.capi.build_and_package_info, "cuda_version", "") or "runtime",
    )
    return cpu_only


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver's user-space library loads: without it CUDA cannot start, whatever else is
    installed (a container gets it from the NVIDIA container toolkit only when handed a GPU)."""
    try:
        ctypes.CDLL(NVIDIA_DRIVER_LIBRARY)
    except OSError:
        return False
    return True


def preload_pip_cuda_libraries() -> None:
    """Loads the CUDA and cuDNN libraries that `meshserve[cuda]` (onnxruntime-gpu's `cuda` and `cudnn`
    extras) installs as pip packages: they lie in site-packages, where the dynamic loader never looks.
    A host with a system CUDA has no such packages and needs nothing loaded."""
    if importlib.util.find_spec("nvidia") is None or not hasattr(ort, "preload_dlls"):
        return
    with printed_to_log(logging.WARNING, "loading the pip-installed CUDA libraries"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # a broken install must leave the worker on CPU, not stop it
            log.warning("could not load the pip-installed CUDA libraries: %s", exc)


@contextlib.contextmanager
def printed_to_log(level: int, what: str) -> Iterator[None]:
    """ONNX Runtime's Python layer reports with print(): libraries it could not load, and a provider that
    failed before it fell back to the next ("EP Error"). That belongs in the worker's log, not on stdout."""
    printed = io.StringIO()
    try:
        with _STDOUT_REDIRECT, contextlib.redirect_stdout(printed):
            yield
    finally:
        lines = [line.strip() for line in printed.getvalue().splitlines()]
        text = " ".join(line for line in lines if line and not line.startswith("***"))  # not an EP Error's frame
        if text:
            log.log(level, "%s: %s", what, text)


def padded_batch_size(config: ModelConfig, provider: str, batchable: bool, convolutions: Callable[[], bool]) -> int:
    """The rows every run is padded to (`batch_padding`), or 0 for no padding. `auto` pads a model with
    convolutions on CUDA, where a new input shape rebuilds cuDNN's Conv plans; elsewhere padding rows
    only cost compute (an MLP on CUDA ran the first batch of each size as fast as the second)."""
    if not batchable or config.max_batch_size < 2 or config.batch_padding == "never":
        return 0
    if config.batch_padding == "always" or (provider == "CUDAExecutionProvider" and convolutions()):
        return config.max_batch_size
    return 0


def has_convolutions(path: Path) -> bool:
    """Whether the model's graph runs a convolution (Conv, ConvTranspose, QLinearConv, ...); weights stay unread."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any("Conv" in node.op_type for node in graph.node)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` grown to `rows` along dim 0 with copies of its last row: values from the request itself,
    so a model that rejects some inputs (an index out of range, an empty string) accepts the padding."""
    return np.concatenate([array, np.repeat(array[-1:], rows - array.shape[0], axis=0)])


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
        self._providers = choose_providers(config.execution_providers, available_providers)
        # 0 (auto) starts with one thread; warm_up() adds the rest when a run is long enough to gain.
        self.intra_op_threads = config.intra_op_threads or 1
        self.runs_inline = False  # warm_up() decides
        try:
            self.session = self._open_session(self.intra_op_threads)
            self.inputs = [_spec(arg) for arg in self.session.get_inputs()]
            self.outputs = [_spec(arg) for arg in self.session.get_outputs()]
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        self.provider = self.session.get_providers()[0]
        if self.provider != self._providers[0]:
            log.warning("model %s version %d asked for %s, got %s", name, version, self._providers[0], self.provider)
        self.output_names = [spec.name for spec in self.outputs]
        self.batchable = (
            config.max_batch_size > 0 and bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        )
        self.max_batch_size = config.max_batch_size if self.batchable else 0
        self.padded_batch_size = padded_batch_size(
            config, self.provider, self.batchable, lambda: has_convolutions(path)
        )
        if self.padded_batch_size:
            log.info("model %s version %d: every batch is padded to %d rows (batch_padding: %s, on %s)",
                     name, version, self.padded_batch_size, config.batch_padding, self.provider,
                     extra={"model": f"{name}:{version}"})  # fmt: skip

    def _open_session(self, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = NATIVE_LOG_SEVERITY
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning intra-op threads burn the cores the event loop (and, on small hosts, the
        # clients) need between runs; sleeping costs microseconds per run.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ONNX Runtime falls back to the next provider itself when one (CUDA) cannot start.
        with printed_to_log(logging.WARNING, f"opening {self.path}"):
            return ort.InferenceSession(str(self.path), sess_options=options, providers=self._providers)

    @property
    def pinned(self) -> bool:
        """Whether each instance runs on cores of its own (`pin_instances`): CPU runs in the executor, several
        instances whose threads cover every usable core, and a platform that can pin a thread. Decided after
        `warm_up`, which picks the threads and may move runs inline.

        A smaller thread budget is left to the kernel: every worker process would pin its instances to the
        same first cores, and several workers on one host would crowd those while the rest stay idle."""
        config = self.config
        return (
            config.pin_instances
            and config.instance_count > 1
            and config.instance_count * self.intra_op_threads >= usable_cores()
            and self.device == "cpu"
            and not self.runs_inline
            and hasattr(os, "sched_setaffinity")
        )

    @property
    def device(self) -> str:
        return "cuda:0" if self.provider == "CUDAExecutionProvider" else "cpu"

    def run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """One run; setting `options.terminate` from another thread stops it at the next operator."""
        padded = self.padded_batch_size
        rows = next(iter(feeds.values())).shape[0] if padded else 0
        if rows >= padded:
            return self.session.run(self.output_names, feeds, options)
        outputs = self.session.run(
            self.output_names, {name: pad_rows(array, padded) for name, array in feeds.items()}, options
        )
        # An output without the batch dim (a model that reduces over the batch) has nothing to cut.
        return [output[:rows] if output.ndim and output.shape[0] == padded else output for output in outputs]

    def warm_up(self) -> None:
        """Runs at load, so the first user request does not pay for lazy initialisation; with
        automatic intra-op threads, also decides how many threads the model gets, and whether
        the model is quick enough to run on the event loop's thread."""
        feeds = {}
        for spec in self.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        try:
            self.run(feeds)
            if not self.config.intra_op_threads and self.device == "cpu" and usable_cores() > 1:
                self._choose_threads(feeds)
            if self.device == "cpu" and self._fixed_size_inputs():
                largest = self._largest_batch_run(feeds)
                self.runs_inline = largest <= INLINE_RUN_LIMIT_S
                if self.runs_inline:
                    log.info(
                        "model %s version %d runs on the event loop's thread (largest batch %.0f us)",
                        self.name,
                        self.version,
                        largest * 1e6,
                        extra={"model": f"{self.name}:{self.version}"},
                    )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: warm-up run failed: {exc}") from None

    def _fixed_size_inputs(self) -> bool:
        """Every input's size is bounded (only the batch dim may vary, up to the max batch size), so a
        run at the largest batch bounds every run's time."""
        variable = slice(1, None) if self.batchable else slice(None)
        return all(spec.datatype != "BYTES" and -1 not in spec.shape[variable] for spec in self.inputs)

    def _median_run(self, feeds: dict[str, np.ndarray]) -> float:
        timings = []
        for _ in range(AUTO_THREADS_PROBE_RUNS):
            started = time.perf_counter()
            self.run(feeds)
            timings.append(time.perf_counter() - started)
        return sorted(timings)[len(timings) // 2]

    def _largest_batch_run(self, feeds: dict[str, np.ndarray]) -> float:
        """The median time of a run at the max batch size; a model slow on one sample stops there."""
        single = self._median_run(feeds)
        if single > INLINE_RUN_LIMIT_S or not self.batchable or self.max_batch_size == 1:
            return single
        return self._median_run({name: np.repeat(array, self.max_batch_size, axis=0) for name, array in feeds.items()})

    def _choose_threads(self, feeds: dict[str, np.ndarray]) -> None:
        """One thread for a model whose single-sample run is short: waking a second thread costs
        more than it saves and takes CPU from the event loop (measured on a 2-core host: an mlp784
        batch of 16 ran in 141 us on one thread, 245 us on two).

        A compute-bound model shares the usable cores among its instances, which run batches side by
        side: more threads than cores only queue behind each other. Batches side by side on one
        thread each beat one batch split over every core, since the split synchronises the threads
        at every operator and one thread preempted (by the event loop, the client, a neighbour)
        stalls the others (cnn on a busy 2-core host, interleaved: 5.3 ms CPU per sample on one
        thread, 6.5 ms on two; the worker did 157 req/s at c=32 with 2 instances x 1 thread, 130
        with 1 instance x 2 threads)."""
        single_run = self._median_run(feeds)
        if single_run >= AUTO_THREADS_THRESHOLD_S:
            threads = max(1, usable_cores() // self.config.instance_count)
            if threads != self.intra_op_threads:
                self.intra_op_threads = threads
                self.session = self._open_session(threads)
                self.run(feeds)
        log.info(
            "model %s version %d: %d intra-op thread(s) x %d instance(s) (one-sample run %.2f ms)",
            self.name,
            self.version,
            self.intra_op_threads,
            self.config.instance_count,
            single_run * 1000,
            extra={"model": f"{self.name}:{self.version}"},
        )
