"""Bare ONNX Runtime in-process: the compute limit a server on the same model can approach.

Runs the model's newest version at several batch sizes, with the worker's
thread budget, and reports samples per second at each; the best batched
figure is what the worker's dynamic batcher is compared against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.report import CPU
from worker.runtime import instance_cores
from worker.tensors import onnx_numpy_dtype


@dataclass(frozen=True)
class BatchThroughput:
    batch_size: int
    runs: int
    samples_per_s: float
    ms_per_run: float
    instances: int = 1
    threads: int = 1
    provider: str = CPU
    pinned: bool = False  # each session on cores of its own, as the worker pins its instances


def model_path(model_dir: Path) -> Path:
    """`<model>/<newest version>/model.onnx`."""
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file())
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no <version>/model.onnx")
    return model_dir / str(versions[-1]) / "model.onnx"


def session(path: Path, threads: int, provider: str = CPU) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = [provider, CPU] if provider != CPU else [CPU]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def random_inputs(sess: object, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every model input; the first (batch) dim is `batch_size`, other dynamic dims 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():  # type: ignore[attr-defined]
        dims = [d if isinstance(d, int) and d >= 0 else 1 for d in arg.shape]
        if dims:
            dims[0] = batch_size
        dtype = onnx_numpy_dtype(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type}: bare ORT feeds numeric tensors only")
        feeds[arg.name] = (
            rng.random(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype=dtype)
        )
    return feeds


def measure(
    model_dir: Path,
    batch_sizes: Sequence[int],
    seconds_each: float,
    threads: int | None = None,
    instances: int = 1,
    provider: str = CPU,
    pinned: bool = False,
) -> list[BatchThroughput]:
    """Samples/s at each batch size: `instances` sessions of `threads` threads each, running side by side, on
    `provider` (the one the worker got, so a GPU worker is compared with bare ORT on the same GPU); `pinned`
    runs each session's thread on the cores `worker.runtime.instance_cores` gives that instance."""
    threads = threads or os.cpu_count() or 1
    path = model_path(model_dir)
    sessions = [session(path, threads, provider) for _ in range(max(instances, 1))]
    cores = sorted(os.sched_getaffinity(0)) if pinned else []
    results = []
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        for batch_size in batch_sizes:
            feeds = random_inputs(sessions[0], batch_size)
            for sess in sessions:
                sess.run(None, feeds)  # type: ignore[attr-defined]  # warm-up: first run allocates
            started = time.perf_counter()
            deadline = started + seconds_each

            def loop(index: int, feeds: dict[str, np.ndarray] = feeds, deadline: float = deadline) -> int:
                # ONNX Runtime releases the GIL, so sessions in threads run in parallel like instances.
                if cores:
                    os.sched_setaffinity(0, instance_cores(index, threads, cores))
                runs = 0
                sess = sessions[index]
                while time.perf_counter() < deadline or runs < 3:
                    sess.run(None, feeds)  # type: ignore[attr-defined]
                    runs += 1
                if cores:
                    os.sched_setaffinity(0, cores)
                return runs

            runs = sum(pool.map(loop, range(len(sessions))))
            elapsed = time.perf_counter() - started
            results.append(
                BatchThroughput(
                    batch_size,
                    runs,
                    runs * batch_size / elapsed,
                    elapsed / runs * len(sessions) * 1000.0,
                    len(sessions),
                    threads,
                    provider,
                    bool(cores),
                )
            )
    return results


def best(results: Sequence[BatchThroughput]) -> BatchThroughput:
    return max(results, key=lambda r: r.samples_per_s)
