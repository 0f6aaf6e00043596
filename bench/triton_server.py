"""Triton Inference Server (nvidia-pytriton) serving ONNX models with ONNX Runtime inside, for the benchmark peers.

pytriton binds a Python callable into a real Triton server; the callable here
runs the same `model.onnx` the worker serves, with the same ONNX Runtime thread
budget, behind Triton's dynamic batcher. Run it as a script (the benchmark
starts it as a child process):

    python bench/triton_server.py --model-repository REPO --model mlp784 --model cnn --grpc-port 8101

Triton's Python backend stub links the system libpython, so this script puts
its own interpreter's LIBDIR first on LD_LIBRARY_PATH before Triton starts
(Triton and its stubs are children of this process and inherit it); without
it model loading fails with an RLock attribute error. nvidia-pytriton needs
numpy<2, so this runs from its own venv (bench/requirements-triton.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

READY_LINE = "TRITON READY"

# ONNX tensor element types -> numpy dtypes (the ones the demo models use and a few more).
_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.bytes_,
}


def libpython_first(environ: dict[str, str] | os._Environ[str]) -> None:
    """Puts this interpreter's LIBDIR (where libpython3.X.so lives) first on LD_LIBRARY_PATH."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest] if libdir else rest)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]


def read_batching_config(model_dir: Path, default_max_batch: int, default_delay_us: int) -> BatchingConfig:
    """The batching knobs from the model's `config.yaml` when it has them, so Triton batches like the worker."""
    max_batch, delay_us, preferred = default_max_batch, default_delay_us, ()
    config_path = model_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        raw = yaml.safe_load(config_path.read_text()) or {}
        batching = raw.get("dynamic_batching") or raw.get("batching") or {}
        max_batch = int(raw.get("max_batch_size", batching.get("max_batch_size", max_batch)))
        if "max_queue_delay_us" in batching or "max_queue_delay_us" in raw:
            delay_us = int(batching.get("max_queue_delay_us", raw.get("max_queue_delay_us")))
        elif "max_queue_delay_ms" in batching or "max_queue_delay_ms" in raw:
            delay_us = int(float(batching.get("max_queue_delay_ms", raw.get("max_queue_delay_ms"))) * 1000)
        preferred = tuple(int(s) for s in batching.get("preferred_batch_sizes", raw.get("preferred_batch_sizes", ())))
    return BatchingConfig(max(max_batch, 1), max(delay_us, 0), preferred)


def newest_version_file(model_dir: Path) -> Path:
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise SystemExit(f"{model_dir}: no <version>/model.onnx")
    return versions[-1][1] / "model.onnx"


def _make_infer(session: Any) -> Callable[..., dict[str, np.ndarray]]:
    from pytriton.decorators import batch

    output_names = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(output_names, inputs)
        return dict(zip(output_names, results, strict=True))

    return infer


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # As the worker runs its sessions: spinning threads would take the cores Triton's own threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def bind_model(triton: Any, name: str, model_dir: Path, threads: int, instances: int, batching: BatchingConfig) -> None:
    """`instances` model instances (Triton runs them side by side), each its own session with `threads`."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    path = newest_version_file(model_dir)
    sessions = [_session(path, threads) for _ in range(max(instances, 1))]

    def tensors(args: list[Any]) -> list[Any]:
        # pytriton shapes exclude the batch dimension; other dynamic dims stay -1.
        return [
            Tensor(
                name=a.name,
                dtype=_ONNX_TO_NUMPY[a.type],
                shape=tuple(d if isinstance(d, int) else -1 for d in a.shape[1:]),
            )
            for a in args
        ]

    batcher = DynamicBatcher(
        max_queue_delay_microseconds=batching.max_queue_delay_us,
        preferred_batch_size=list(batching.preferred_batch_sizes) or None,
    )
    triton.bind(
        model_name=name,
        infer_func=[_make_infer(session) for session in sessions],
        inputs=tensors(sessions[0].get_inputs()),
        outputs=tensors(sessions[0].get_outputs()),
        config=ModelConfig(max_batch_size=batching.max_batch_size, batcher=batcher),
        strict=False,
    )
    logging.info(
        "bound %s (max batch %d, max queue delay %d us, %d instance(s) x %d intra-op thread(s))",
        name,
        batching.max_batch_size,
        batching.max_queue_delay_us,
        len(sessions),
        threads,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, help="model directory name; repeat for several")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument(
        "--intra-op-threads", type=int, default=os.cpu_count() or 1, help="for models without --threads"
    )
    parser.add_argument("--threads", action="append", default=[], help="MODEL=N intra-op threads for one model")
    parser.add_argument("--instances", action="append", default=[], help="MODEL=N model instances [default: 1]")
    parser.add_argument("--max-batch-size", type=int, default=32, help="when config.yaml does not say")
    parser.add_argument("--max-queue-delay-us", type=int, default=500, help="when config.yaml does not say")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s triton-bench %(message)s")

    threads = {name: int(n) for name, _, n in (item.partition("=") for item in args.threads)}
    instances = {name: int(n) for name, _, n in (item.partition("=") for item in args.instances)}
    libpython_first(os.environ)
    from pytriton.triton import Triton, TritonConfig

    # pytriton stops cleanly on KeyboardInterrupt; make SIGTERM mean the same.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        for name in args.model:
            model_dir = args.model_repository / name
            batching = read_batching_config(model_dir, args.max_batch_size, args.max_queue_delay_us)
            threads_each = threads.get(name, args.intra_op_threads)
            bind_model(triton, name, model_dir, threads_each, instances.get(name, 1), batching)
        triton.connect()
        print(READY_LINE, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
