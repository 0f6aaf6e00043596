"""Closed-loop load from the stock `tritonclient.grpc.aio` client: the same client for every peer.

Triton, a worker and the gateway are all called through it, so the client's
own per-request cost is the same in every column of the results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np

from meshserve.loadgen import LevelResult, closed_loop

_NUMPY_TO_TRITON = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}


def triton_error_code(exc: BaseException) -> str | None:
    """`StatusCode.UNAVAILABLE` -> `UNAVAILABLE` for tritonclient's exception, None for anything else."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = exc.status() or "UNKNOWN"
        return str(status).removeprefix("StatusCode.")
    return None


def infer_inputs(feeds: dict[str, np.ndarray]) -> list[object]:
    from tritonclient.grpc import InferInput

    inputs = []
    for name, array in feeds.items():
        tensor = InferInput(name, list(array.shape), _NUMPY_TO_TRITON[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonClientLoad:
    """One `tritonclient.grpc.aio` client (one channel) for one server; `run` measures one model at one level."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 10.0) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        self.url = url
        self.client = InferenceServerClient(url=url)
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout_s = timeout_s

    async def ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model, headers=self.headers))
        except Exception:
            return False

    async def wait_ready(
        self, model: str, timeout_s: float, still_alive: Callable[[], None] = lambda: None, interval_s: float = 0.2
    ) -> None:
        """Until `model` answers ready; `still_alive` raises when the server is gone, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not await self.ready(model):
            still_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} not ready at {self.url} after {timeout_s:g}s")
            await asyncio.sleep(interval_s)

    async def infer(self, model: str, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """One request; the named outputs as arrays."""
        result = await self.client.infer(
            model, infer_inputs(feeds), headers=self.headers, client_timeout=self.timeout_s
        )
        return [result.as_numpy(name) for name in output_names]

    async def run(
        self, model: str, feeds: dict[str, np.ndarray], concurrency: int, duration_s: float, warmup_s: float
    ) -> LevelResult:
        # Inputs are built once: the load generator should spend its CPU on calls, not on numpy.
        inputs = infer_inputs(feeds)

        async def send() -> None:
            await self.client.infer(model, inputs, headers=self.headers, client_timeout=self.timeout_s)

        return await closed_loop(send, concurrency, duration_s, warmup_s, classify=triton_error_code)

    async def close(self) -> None:
        await self.client.close()


# (rtol, atol) against CPU ONNX Runtime. On a GPU, cuDNN and cuBLAS accumulate in other orders and may use TF32:
# the demo cnn's probabilities differed by up to 7e-4 relative on an H200.
CPU_TOLERANCE = (1e-4, 1e-5)
GPU_TOLERANCE = (1e-2, 1e-3)


def check_outputs_agree(
    expected: Sequence[np.ndarray], got: Sequence[np.ndarray], what: str, tolerance: tuple[float, float] = CPU_TOLERANCE
) -> None:
    """Raises when a peer's answer differs from in-process ONNX Runtime (a fast wrong answer is no result)."""
    rtol, atol = tolerance
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, err_msg=what)
