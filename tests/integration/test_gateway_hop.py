"""The gateway's side of the batched hop against real workers: a stream that breaks fails every request
in flight on it with a retryable UNAVAILABLE, and through the gateway those requests fail over."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

from gateway import wire
from gateway.upstream import Upstream, UpstreamOptions
from loadbalancer.errors import AttemptFailed
from tests.harness import ProcessGroup
from tests.integration.test_worker_batching import abandoned_runs
from tests.integration.test_worker_stream import in_flight, request, until_in_flight
from tests.worker_models import save, slow_model

pytestmark = pytest.mark.integration

REQUEST_MARK: contextvars.ContextVar[str] = contextvars.ContextVar("request_mark", default="none")


class MarkRecorder(logging.Handler):
    """Which request mark the context of each gateway.upstream log line carries."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append(REQUEST_MARK.get())


async def test_a_broken_stream_fails_every_in_flight_id(demo_repository: Path, processes: ProcessGroup) -> None:
    worker, address = processes.worker(demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "5000")
    x = np.ones((1, 64), np.float32)
    recorder = MarkRecorder()
    logger = logging.getLogger("gateway.upstream")
    logger.addHandler(recorder)
    upstream = Upstream(address)
    try:

        async def one(i: int) -> wire.ResponseHead:
            REQUEST_MARK.set(f"request-{i}")  # as a request's span would be
            return await upstream.infer(request("digits", x, f"client-{i}").SerializeToString(), b"", 30)

        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        async with grpc.aio.insecure_channel(address) as channel:
            await until_in_flight(channel, 6)
        worker.kill9()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    finally:
        logger.removeHandler(recorder)
        await upstream.close()
    for result in results:
        assert isinstance(result, AttemptFailed), result
        assert result.code == grpc.StatusCode.UNAVAILABLE
    # The reader that noticed the break runs in its own context, not in the request's that opened the stream.
    assert recorder.marks and set(recorder.marks) == {"none"}


async def test_a_request_given_up_leaves_its_stream_working(demo_repository: Path, processes: ProcessGroup) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    x = np.ones((1, 64), np.float32)
    upstream = Upstream(address, UpstreamOptions(streams=1))
    try:
        await upstream.infer(request("digits", x, "opens").SerializeToString(), b"", 30)
        given_up = asyncio.create_task(upstream.infer(request("digits", x, "a").SerializeToString(), b"", 30))
        kept = asyncio.create_task(upstream.infer(request("digits", x, "b").SerializeToString(), b"", 30))
        await asyncio.sleep(0)  # both on their way, the first one's write started
        given_up.cancel()  # as a client cancelling or a losing hedge would
        head = await asyncio.wait_for(kept, 30)
        again = await upstream.infer(request("digits", x, "c").SerializeToString(), b"", 30)
    finally:
        await upstream.close()
    assert head.error_message == "" and again.error_message == ""
    assert given_up.cancelled()


async def test_requests_given_up_are_dropped_by_the_worker(demo_repository: Path, processes: ProcessGroup) -> None:
    # 5 s of injected latency: without a cancel on the hop the worker would hold all four for 5 s.
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1", "--inject-latency-ms", "5000")
    x = np.ones((1, 64), np.float32)
    upstream = Upstream(address, UpstreamOptions(streams=1))
    try:
        tasks = [
            asyncio.create_task(upstream.infer(request("digits", x, f"r{i}").SerializeToString(), b"", 30))
            for i in range(3)
        ]
        timed_out = asyncio.create_task(upstream.infer(request("digits", x, "t").SerializeToString(), b"", 0.5))
        async with grpc.aio.insecure_channel(address) as channel:
            await until_in_flight(channel, 4)
            tasks[0].cancel()  # as a client cancelling or a losing hedge would
            tasks[1].cancel()
            with pytest.raises(TimeoutError):
                await timed_out  # its deadline passed in the gateway
            for _ in range(100):
                if await in_flight(channel) == 1:
                    break
                await asyncio.sleep(0.02)
            assert await in_flight(channel) == 1  # only the request somebody still waits for
        head = await asyncio.wait_for(tasks[2], 30)
    finally:
        await upstream.close()
    assert head.error_message == ""


async def test_a_run_whose_request_the_gateway_gave_up_on_is_stopped(tmp_path: Path, processes: ProcessGroup) -> None:
    save(slow_model(width=1024, depth=512), tmp_path, "slow", config="max_batch_size: 512\nintra_op_threads: 1\n")
    worker, address = processes.worker(tmp_path, "--host", "127.0.0.1")
    upstream = Upstream(address, UpstreamOptions(streams=1))
    big = request("slow", np.ones((512, 1024), np.float32), "big")  # ~3 s of ONNX Runtime on one thread here
    try:
        with pytest.raises(TimeoutError):
            await upstream.infer(big.SerializeToString(), b"", 0.5)  # its deadline passes in the gateway
        # The cancel on the hop reaches the worker, which stops the run nobody waits for any more.
        for _ in range(200):
            if await asyncio.to_thread(abandoned_runs, worker.output(), "slow") == 1:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(abandoned_runs, worker.output(), "slow") == 1
    finally:
        await upstream.close()


async def test_requests_in_flight_on_a_killed_worker_fail_over(
    demo_repository: Path, processes: ProcessGroup, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "digits").symlink_to(demo_repository / "digits")
    _, registry_url = processes.registry()
    slow = ("--host", "127.0.0.1", "--inject-latency-ms", "1500")
    doomed, doomed_address = processes.worker(repository, *slow, registry_url=registry_url)
    processes.worker(repository, *slow, registry_url=registry_url)
    gateway, address = processes.gateway(registry_url)
    gateway.wait_for_output("127.0.0.1", timeout=10)
    await asyncio.sleep(1.0)  # both workers registered and picked up
    x = np.random.default_rng(3).random((1, 64), dtype=np.float32)
    async with triton_aio.InferenceServerClient(address) as client:

        async def one() -> np.ndarray:
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("digits", [tensor], client_timeout=30)
            return result.as_numpy("probabilities")

        tasks = [asyncio.create_task(one()) for _ in range(8)]
        async with grpc.aio.insecure_channel(doomed_address) as channel:
            await until_in_flight(channel, 1)
        doomed.kill9()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for probabilities in results:
        np.testing.assert_allclose(probabilities, results[0], rtol=1e-5)
    assert "failing over" in gateway.output()


async def _staggered_over_one_stream(address: str, busy_wait_s: float, count: int) -> tuple[list[bytes], list[str]]:
    """`count` requests starting one gateway loop iteration apart on one stream; the messages written, the answers."""
    x = np.ones((1, 64), np.float32)
    upstream = Upstream(address, UpstreamOptions(streams=1, busy_wait_s=busy_wait_s))
    try:
        await upstream.infer(request("digits", x, "opens").SerializeToString(), b"", 30)
        stream = upstream._streams[0]
        written: list[bytes] = []
        write = stream.call.write

        async def recording_write(message: bytes) -> None:
            written.append(message)
            await write(message)

        stream.call.write = recording_write  # type: ignore[method-assign]

        async def one(i: int) -> wire.ResponseHead:
            for _ in range(i):
                await asyncio.sleep(0)
            return await upstream.infer(request("digits", x, f"r{i}").SerializeToString(), b"", 30)

        heads = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 30)
    finally:
        await upstream.close()
    return written, [head.error_message for head in heads]


async def test_requests_arriving_while_the_gateway_is_busy_share_one_message(
    demo_repository: Path, processes: ProcessGroup
) -> None:
    _, address = processes.worker(demo_repository, "--host", "127.0.0.1")
    written, errors = await _staggered_over_one_stream(address, busy_wait_s=5.0, count=8)
    assert errors == [""] * 8
    assert len(written) == 1
    assert len(list(wire.batch_entries(written[0]))) == 8

    written, errors = await _staggered_over_one_stream(address, busy_wait_s=0.0, count=8)
    assert errors == [""] * 8
    assert len(written) > 1  # without the wait the first request leaves alone
