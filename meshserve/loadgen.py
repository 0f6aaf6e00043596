"""Closed-loop asyncio load generator for KServe v2 `ModelInfer` (what `meshserve bench` runs).

N tasks each keep one request in flight for a warm-up period and then a
measured period; every request completed inside the measured window counts
toward throughput and the latency percentiles, failures are counted by gRPC
status code. `closed_loop` takes any async request function, so the
benchmark scripts drive other clients (tritonclient) through the same
bookkeeping.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from meshserve.settings import MeshSettings

# KServe v2 datatypes -> numpy dtypes for random inputs (BYTES is handled apart).
_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
PROGRESS_INTERVAL_S = 0.2


class BenchSettings(MeshSettings):
    """Settings of `meshserve bench` (`MESHSERVE_URL`, `MESHSERVE_API_KEY`, `MESHSERVE_CONCURRENCY`, ...)."""

    url: str = "127.0.0.1:8001"
    api_key: str | None = None
    model_version: str = ""
    # NoDecode: MESHSERVE_CONCURRENCY is written like the flag, `1,8,32`, not as JSON.
    concurrency: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 8, 32])
    duration: float = 10.0
    warmup: float = 1.0
    timeout: float = 10.0
    batch_size: int = 1

    @field_validator("concurrency", mode="before")
    @classmethod
    def _parse_levels(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        levels = [int(v) for v in value]
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f"concurrency levels must be positive integers, got {value!r}")
        return levels

    @field_validator("duration", "timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0, got {value}")
        return value

    @field_validator("warmup")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value


@dataclass(frozen=True)
class LevelResult:
    """What one concurrency level measured. Latencies in milliseconds."""

    concurrency: int
    duration_s: float
    requests: int
    errors: dict[str, int]
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON; a level without one success has None percentiles."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(concurrency: int, duration_s: float, latencies_s: Sequence[float], errors: Counter[str]) -> LevelResult:
    ordered = sorted(latencies_s)
    ms = [v * 1000.0 for v in ordered]
    return LevelResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(ms),
        errors=dict(sorted(errors.items())),
        throughput=len(ms) / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1] if ms else math.nan,
        mean_ms=sum(ms) / len(ms) if ms else math.nan,
    )


def grpc_error_code(exc: BaseException) -> str | None:
    """The status code name of a failed gRPC call, None for anything else."""
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return code.name if code is not None else "UNKNOWN"
    return None


ProgressCallback = Callable[[int, float, int], None]
"""(concurrency, seconds since the level started, warm-up included; measured requests so far)."""


async def closed_loop(
    send: Callable[[], Awaitable[Any]],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
    classify: Callable[[BaseException], str | None] = grpc_error_code,
    on_progress: ProgressCallback | None = None,
) -> LevelResult:
    """Keeps `concurrency` requests in flight for warm-up + duration; summarizes the measured window.

    `classify` names the status of a failed request; exceptions it returns
    None for are not load failures and propagate.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    clock = time.perf_counter
    started_at = clock()
    measure_from = started_at + warmup_s
    stop_at = measure_from + duration_s

    async def client() -> None:
        while (started := clock()) < stop_at:
            try:
                await send()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = classify(exc)
                if code is None:
                    raise
                if measure_from <= clock() <= stop_at:
                    errors[code] += 1
                continue
            finished = clock()
            if finished <= stop_at and started >= measure_from:
                latencies.append(finished - started)

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if on_progress is not None:
                on_progress(concurrency, min(clock() - started_at, warmup_s + duration_s), len(latencies))

    reporter = asyncio.create_task(report())
    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*clients)
    finally:
        # One client's unexpected error ends the level: nothing keeps sending behind the caller's back.
        for task in (reporter, *clients):
            task.cancel()
    if on_progress is not None:
        on_progress(concurrency, warmup_s + duration_s, len(latencies))
    return summarize(concurrency, duration_s, latencies, errors)


def random_tensor(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, bytes]:
    """A random tensor of a KServe datatype and its `raw_input_contents` bytes."""
    if datatype == "BYTES":
        values = np.array([rng.bytes(8) for _ in range(int(np.prod(shape)))], dtype=object).reshape(shape)
        raw = b"".join(len(v).to_bytes(4, "little") + v for v in values.flat)
        return values, raw
    dtype = _NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"cannot make random data for datatype {datatype}")
    if dtype is np.bool_:
        array = rng.integers(0, 2, size=shape).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        array = rng.integers(0, 10, size=shape).astype(dtype)
    else:
        array = rng.random(size=shape).astype(dtype)
    return array, array.tobytes()


def concrete_shape(shape: Sequence[int], batch_size: int, batched: bool) -> list[int]:
    """A metadata shape with dynamic dims filled: the batch dim from `batch_size`, any other -1 as 1."""
    dims = [int(d) for d in shape]
    if batched and dims:
        dims[0] = batch_size
    return [d if d >= 0 else 1 for d in dims]


def random_request(metadata: Any, batch_size: int = 1, version: str = "", seed: int = 0) -> Any:
    """A `ModelInferRequest` with random raw inputs matching the model's metadata."""
    from protos import grpc_service_pb2

    rng = np.random.default_rng(seed)
    request = grpc_service_pb2.ModelInferRequest(model_name=metadata.name, model_version=version)
    for tensor in metadata.inputs:
        batched = len(tensor.shape) > 0 and tensor.shape[0] == -1
        shape = concrete_shape(tensor.shape, batch_size, batched)
        _, raw = random_tensor(tensor.datatype, shape, rng)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


class LoadGenerator:
    """Drives one model at several concurrency levels over meshserve's KServe v2 stubs."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.metadata: list[tuple[str, str]] = []
        if settings.api_key:
            self.metadata.append(("authorization", f"Bearer {settings.api_key}"))

    def _channel(self) -> Any:
        import grpc

        return grpc.aio.insecure_channel(
            self.settings.url,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )

    async def model_metadata(self, channel: Any, model: str) -> Any:
        from protos import grpc_service_pb2, grpc_service_pb2_grpc

        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = grpc_service_pb2.ModelMetadataRequest(name=model, version=self.settings.model_version)
        return await stub.ModelMetadata(request, metadata=self.metadata, timeout=self.settings.timeout)

    async def run(self, model: str, on_progress: ProgressCallback | None = None) -> list[LevelResult]:
        """Fetches the model's metadata, then measures each concurrency level in turn on one channel."""
        async with self._channel() as channel:
            metadata = await self.model_metadata(channel, model)
            request = random_request(metadata, self.settings.batch_size, self.settings.model_version)
            payload = request.SerializeToString()
            # The request is serialized once and sent as bytes: on a small
            # machine the load generator's own CPU per call matters.
            infer = channel.unary_unary(MODEL_INFER_METHOD)

            async def send() -> None:
                await infer(payload, metadata=self.metadata, timeout=self.settings.timeout)

            results = []
            for level in self.settings.concurrency:
                results.append(
                    await closed_loop(
                        send, level, self.settings.duration, self.settings.warmup, on_progress=on_progress
                    )
                )
            return results


def report_dict(model: str, settings: BenchSettings, results: Sequence[LevelResult]) -> dict[str, Any]:
    """The JSON document `meshserve bench --json` writes (stable keys, for plots)."""
    return {
        "model": model,
        "model_version": settings.model_version,
        "url": settings.url,
        "batch_size": settings.batch_size,
        "duration_s": settings.duration,
        "warmup_s": settings.warmup,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "levels": [r.to_dict() for r in results],
    }
