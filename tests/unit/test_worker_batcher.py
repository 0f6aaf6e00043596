"""The dynamic batcher with real ONNX Runtime sessions, in-process."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry

from tests.worker_models import add_model, gather_model, save, slow_model, static_model
from worker.batcher import Batcher, Job, JobResult
from worker.config import ModelConfig
from worker.errors import InferenceError
from worker.metrics import WorkerMetrics
from worker.repository import ModelRepository
from worker.runtime import OnnxModel

CPU = ["CPUExecutionProvider"]


def load(tmp_path: Path, model: onnx.ModelProto, **config: object) -> OnnxModel:
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    onnx_model = OnnxModel("m", 1, path, ModelConfig(**config), CPU)
    onnx_model.warm_up()
    return onnx_model


def in_executor(model: OnnxModel) -> OnnxModel:
    """The test models run in microseconds, so they would run inline; these tests are about the executor path."""
    model.runs_inline = False
    return model


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=True)


async def started(model: OnnxModel, executor: ThreadPoolExecutor) -> Batcher:
    batcher = Batcher(model, executor, WorkerMetrics().for_model("m"))
    batcher.start()
    return batcher


def job(*inputs: np.ndarray, deadline: float | None = None) -> Job:
    return Job(list(inputs), inputs[0].shape[0], [0], asyncio.get_running_loop().create_future(), deadline)


async def test_queued_requests_share_one_run_and_get_their_own_rows(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(1.0)), executor)
    # Submitted in one go (no await in between): the first run takes them all.
    jobs = [job(np.full((1 + i % 2, 4), i, np.float32)) for i in range(10)]
    futures = [batcher.submit(j) for j in jobs]
    results = await asyncio.gather(*futures)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs[0], np.full((1 + i % 2, 4), i + 1, np.float32))
        assert result.raw[0] == result.outputs[0].tobytes()
    assert {r.batch_size for r in results} == {sum(1 + i % 2 for i in range(10))}
    await batcher.stop()


async def test_a_padded_batch_answers_each_request_with_its_own_rows(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(1.0), max_batch_size=16, batch_padding="always"), executor)
    futures = [batcher.submit(job(np.full((1 + i % 3, 4), i, np.float32))) for i in range(5)]
    results = await asyncio.gather(*futures)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs[0], np.full((1 + i % 3, 4), i + 1, np.float32))
    assert {r.batch_size for r in results} == {sum(1 + i % 3 for i in range(5))}  # the rows asked for, not 16
    await batcher.stop()


async def test_batch_never_exceeds_max_rows(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(0.0), max_batch_size=4), executor)
    futures = [batcher.submit(job(np.zeros((3, 4), np.float32))) for _ in range(5)]
    results = await asyncio.gather(*futures)
    assert all(r.batch_size == 3 for r in results)  # 3 + 3 > 4: never two together
    await batcher.stop()


async def test_preferred_sizes_trim_the_batch(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(0.0), max_batch_size=8, preferred_batch_sizes=[4]), executor)
    futures = [batcher.submit(job(np.zeros((1, 4), np.float32))) for _ in range(6)]
    results = await asyncio.gather(*futures)
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    await batcher.stop()


async def test_queue_delay_waits_for_company(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(0.0), max_queue_delay_us=300_000), executor)
    first = batcher.submit(job(np.zeros((1, 4), np.float32)))
    await asyncio.sleep(0.05)  # well inside the delay
    second = batcher.submit(job(np.zeros((1, 4), np.float32)))
    assert [r.batch_size for r in await asyncio.gather(first, second)] == [2, 2]
    await batcher.stop()


async def submitted_one_per_iteration(batcher: Batcher, count: int) -> list[JobResult]:
    """`count` requests reaching the batcher one event-loop iteration apart, as gRPC delivers them."""
    futures = []
    for i in range(count):
        futures.append(batcher.submit(job(np.full((1, 4), i, np.float32))))
        await asyncio.sleep(0)
    return await asyncio.wait_for(asyncio.gather(*futures), 10)


async def test_requests_still_arriving_join_the_batch(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(1.0)), executor)
    results = await submitted_one_per_iteration(batcher, 12)
    assert [r.batch_size for r in results] == [12] * 12
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs[0], np.full((1, 4), i + 1, np.float32))
    await batcher.stop()


async def test_without_the_busy_wait_they_leave_one_by_one(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(1.0), max_busy_wait_us=0), executor)
    results = await submitted_one_per_iteration(batcher, 12)
    assert max(r.batch_size for r in results) < 12
    await batcher.stop()


async def test_a_lone_request_on_an_idle_worker_runs_at_once(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(1.0), max_busy_wait_us=10_000_000), executor)
    started_at = time.monotonic()
    result = await asyncio.wait_for(batcher.submit(job(np.zeros((1, 4), np.float32))), 5)
    assert result.batch_size == 1
    assert time.monotonic() - started_at < 1.0  # not the 10 s the busy wait allows
    await batcher.stop()


async def test_requests_merge_only_when_trailing_dims_agree(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    batcher = await started(load(tmp_path, model), executor)
    shapes = [(1, 3), (1, 5), (2, 3)]
    futures = [batcher.submit(job(np.full(shape, i, np.float32))) for i, shape in enumerate(shapes)]
    results = await asyncio.gather(*futures)
    assert [r.batch_size for r in results] == [3, 1, 3]
    for i, (shape, result) in enumerate(zip(shapes, results, strict=True)):
        np.testing.assert_array_equal(result.outputs[0], np.full(shape, i, np.float32))
    await batcher.stop()


async def test_full_queue_refuses_at_once(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    model = load(tmp_path, add_model(0.0), max_queue_size=2)
    batcher = Batcher(model, executor, WorkerMetrics().for_model("m"))  # not started: nothing drains the queue
    batcher.submit(job(np.zeros((1, 4), np.float32)))
    batcher.submit(job(np.zeros((1, 4), np.float32)))
    with pytest.raises(InferenceError) as caught:
        batcher.submit(job(np.zeros((1, 4), np.float32)))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in caught.value.message
    await batcher.stop()


async def test_expired_deadline_is_dropped_not_run(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(0.0)), executor)
    now = asyncio.get_running_loop().time()
    late = batcher.submit(job(np.zeros((1, 4), np.float32), deadline=now - 1))
    fine = batcher.submit(job(np.zeros((1, 4), np.float32), deadline=now + 60))
    with pytest.raises(InferenceError) as caught:
        await late
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await fine).batch_size == 1  # the dropped one did not take a row
    await batcher.stop()


async def test_cancelled_request_is_skipped(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, add_model(0.0)), executor)
    gone = batcher.submit(job(np.zeros((1, 4), np.float32)))
    gone.cancel()
    kept = batcher.submit(job(np.zeros((1, 4), np.float32)))
    assert (await kept).batch_size == 1
    await batcher.stop()


async def test_one_failing_request_does_not_fail_its_batch(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = await started(load(tmp_path, gather_model()), executor)
    indices = [1, 2, 50, 3]
    futures = [batcher.submit(job(np.array([[i]], np.int64))) for i in indices]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(outcomes[2], InferenceError)
    assert outcomes[2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'm' version 1 failed to run" in outcomes[2].message
    for i in (0, 1, 3):
        assert outcomes[i].outputs[0][0, 0] == indices[i] * 10  # type: ignore[union-attr]
    await batcher.stop()


async def test_unbatchable_model_runs_requests_alone(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    model = load(tmp_path, static_model())
    assert not model.batchable and model.max_batch_size == 0
    batcher = await started(model, executor)
    x = np.ones((2, 3), np.float32)
    futures = [batcher.submit(Job([x], 1, [0, 1], asyncio.get_running_loop().create_future())) for _ in range(3)]
    for result in await asyncio.gather(*futures):
        assert result.batch_size == 1
        np.testing.assert_array_equal(result.outputs[0], 2 * x)
        assert result.outputs[1] == 6
    await batcher.stop()


async def test_stop_fails_queued_requests_as_unavailable(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    batcher = Batcher(load(tmp_path, add_model(0.0)), executor, WorkerMetrics().for_model("m"))
    queued = batcher.submit(job(np.zeros((1, 4), np.float32)))
    await batcher.stop()
    with pytest.raises(InferenceError) as caught:
        await queued
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_stop_during_a_run_fails_that_batch_as_unavailable(tmp_path: Path) -> None:
    # One executor thread, held busy, so the batch sits in run_in_executor when stop() comes.
    pool = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    pool.submit(release.wait, 10)
    batcher = Batcher(in_executor(load(tmp_path, add_model(0.0))), pool, WorkerMetrics().for_model("m"))
    batcher.start()
    running = batcher.submit(job(np.zeros((1, 4), np.float32)))
    await asyncio.sleep(0.05)  # event-loop turns only: the batcher takes the job and hands it to the pool
    assert batcher.running == 1 and batcher.depth == 0
    await batcher.stop()
    release.set()
    with pytest.raises(InferenceError) as caught:
        await asyncio.wait_for(running, 5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    pool.shutdown(wait=True)


def slow_batcher(tmp_path: Path, pool: ThreadPoolExecutor) -> Batcher:
    """A model whose batch of 1024 rows runs for seconds (~3 s here), one operator at a time."""
    model = load(tmp_path, slow_model(width=1024, depth=256), max_batch_size=1024)
    assert not model.runs_inline
    batcher = Batcher(model, pool, WorkerMetrics().for_model("m"))
    batcher.start()
    return batcher


def abandoned_runs(batcher: Batcher) -> float:
    return batcher.metrics.abandoned_runs._value.get()


async def running_batch(batcher: Batcher, rows: int) -> list[asyncio.Future[JobResult]]:
    """Two requests of `rows` rows each, taken as one batch and handed to ONNX Runtime."""
    futures = [batcher.submit(job(np.ones((rows, 1024), np.float32))) for _ in range(2)]
    for _ in range(2000):  # event-loop turns until the batcher has taken both
        if batcher.running == 2:
            return futures
        await asyncio.sleep(0.005)
    raise AssertionError("the batch never reached ONNX Runtime")


async def test_a_run_nobody_waits_for_any_more_stops_before_its_end(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = slow_batcher(tmp_path, pool)
    first, second = await running_batch(batcher, 512)
    first.cancel()
    await asyncio.sleep(0.05)
    assert abandoned_runs(batcher) == 0  # the second request still waits: the run goes on
    second.cancel()
    # The one thread comes back once ONNX Runtime returns; it counts the run only when it
    # stopped on the terminate flag, i.e. before running all of its 256 operators.
    await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
    assert abandoned_runs(batcher) == 1
    # The instance serves the next request as usual.
    result = await asyncio.wait_for(batcher.submit(job(np.full((1, 1024), 3, np.float32))), 30)
    np.testing.assert_array_equal(result.outputs[0], np.full((1, 1024), 3, np.float32))
    await batcher.stop()
    pool.shutdown(wait=True)


async def test_a_run_with_one_request_still_waiting_finishes_for_it(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = slow_batcher(tmp_path, pool)
    gone, waiting = await running_batch(batcher, 16)
    gone.cancel()
    result = await asyncio.wait_for(waiting, 30)
    np.testing.assert_array_equal(result.outputs[0], np.ones((16, 1024), np.float32))
    assert result.batch_size == 32 and abandoned_runs(batcher) == 0
    await batcher.stop()
    pool.shutdown(wait=True)


async def test_unloading_mid_run_stops_the_run(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = slow_batcher(tmp_path, pool)
    futures = await running_batch(batcher, 512)
    await batcher.stop()
    for future in futures:
        with pytest.raises(InferenceError) as caught:
            await future
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
    assert abandoned_runs(batcher) == 1
    pool.shutdown(wait=True)


async def test_instance_count_runs_batches_side_by_side(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(max_workers=4)
    release = threading.Event()
    for _ in range(4):  # hold every thread, so runs stay in flight until released
        pool.submit(release.wait, 10)
    model = in_executor(load(tmp_path, add_model(1.0), instance_count=2))
    batcher = Batcher(model, pool, WorkerMetrics().for_model("m"))
    batcher.start()
    first = batcher.submit(job(np.zeros((1, 4), np.float32)))
    await asyncio.sleep(0.05)  # the first instance takes it
    second = batcher.submit(job(np.ones((1, 4), np.float32)))
    await asyncio.sleep(0.05)  # the second instance takes this one while the first run is pending
    assert batcher.running == 2
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert [r.batch_size for r in results] == [1, 1]
    np.testing.assert_array_equal(results[1].outputs[0], np.full((1, 4), 2, np.float32))
    await batcher.stop()
    pool.shutdown(wait=True)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to"
)
async def test_pinned_instances_run_side_by_side_each_on_a_core_of_its_own(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    threads = len(cores) // 2  # two instances over every core: what automatic threads give a slow model
    model = in_executor(load(tmp_path, add_model(1.0), instance_count=2, intra_op_threads=threads, pin_instances=True))
    assert model.pinned
    seen: list[frozenset[int]] = []
    both_inside = threading.Barrier(2, timeout=10)  # breaks (failing the runs) unless two runs overlap
    original_run = model.run

    def run(feeds: dict[str, np.ndarray], options: object = None) -> list[np.ndarray]:
        seen.append(frozenset(os.sched_getaffinity(0)))
        both_inside.wait()
        return original_run(feeds, options)  # type: ignore[arg-type]

    model.run = run  # type: ignore[method-assign]
    batcher = Batcher(model, ThreadPoolExecutor(max_workers=1), WorkerMetrics().for_model("m"))
    batcher.start()
    first = batcher.submit(job(np.zeros((1, 4), np.float32)))
    await asyncio.sleep(0.05)  # the first instance takes it and waits for company
    second = batcher.submit(job(np.ones((1, 4), np.float32)))
    results = await asyncio.wait_for(asyncio.gather(first, second), 20)
    np.testing.assert_array_equal(results[1].outputs[0], np.full((1, 4), 2, np.float32))
    assert sorted(seen, key=min) == [frozenset(cores[:threads]), frozenset(cores[threads : 2 * threads])]
    assert sorted(os.sched_getaffinity(0)) == cores  # only the instances' threads are pinned
    await batcher.stop()


async def test_a_microsecond_model_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    model = load(tmp_path, add_model(1.0))
    assert model.runs_inline
    # Every executor thread is held: the batches can only complete without it.
    pool = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    pool.submit(release.wait, 10)
    batcher = Batcher(model, pool, WorkerMetrics().for_model("m"))
    batcher.start()
    try:
        futures = [batcher.submit(job(np.full((2, 4), i, np.float32))) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.outputs[0], np.full((2, 4), i + 1, np.float32))
        assert [r.batch_size for r in results] == [6, 6, 6]
        bad = batcher.submit(Job([np.zeros((1, 4), np.float32)], 1, [0], asyncio.get_running_loop().create_future()))
        bad.cancel()  # a cancelled caller is skipped inline as well
        assert (await batcher.submit(job(np.zeros((1, 4), np.float32)))).batch_size == 1
    finally:
        release.set()
        await batcher.stop()
        pool.shutdown(wait=True)


async def test_a_failing_request_fails_alone_inline(tmp_path: Path, executor) -> None:  # type: ignore[no-untyped-def]
    model = load(tmp_path, gather_model())
    assert model.runs_inline
    batcher = await started(model, executor)
    outcomes = await asyncio.gather(
        *(batcher.submit(job(np.array([[i]], np.int64))) for i in (4, 99, 5)), return_exceptions=True
    )
    assert isinstance(outcomes[1], InferenceError) and outcomes[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert [outcomes[0].outputs[0][0, 0], outcomes[2].outputs[0][0, 0]] == [40, 50]  # type: ignore[union-attr]
    await batcher.stop()


def test_a_compute_bound_model_runs_in_the_executor(tmp_path: Path) -> None:
    from meshserve.demo_models import build_cnn

    cnn = build_cnn()
    cnn.ir_version = 9
    model = load(tmp_path, cnn, max_batch_size=32)
    assert not model.runs_inline  # milliseconds per sample: the event loop must not wait for it


def test_inputs_of_unbounded_size_never_run_inline(tmp_path: Path) -> None:
    ragged = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(ragged, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    assert not load(tmp_path, model).runs_inline  # a long second dim could take any time
    # Batching off: nothing bounds dim 0 either.
    unbatched = load(tmp_path, add_model(0.0), max_batch_size=0)
    assert not unbatched.batchable and not unbatched.runs_inline
    # A fixed-shape model without a batch dim is bounded.
    assert load(tmp_path, static_model()).runs_inline


async def test_queue_depth_metric_counts_every_version_of_a_model(tmp_path: Path) -> None:
    # A long queue delay holds the requests in the queues while the metric is read.
    config = "max_queue_delay_us: 10000000\npreferred_batch_sizes: [8]\n"
    save(add_model(1.0), tmp_path, "m", version=1, config=config)
    save(add_model(2.0), tmp_path, "m", version=2, config=config)
    metrics = WorkerMetrics(CollectorRegistry())
    pool = ThreadPoolExecutor(max_workers=2)
    repository = ModelRepository(tmp_path, pool, metrics)
    await repository.load_all()
    try:
        futures = [
            repository.get("m", version).batcher.submit(job(np.zeros((1, 4), np.float32)))
            for version in ("1", "1", "2")
        ]
        labels = {"component": "worker", "model": "m"}
        assert metrics.registry.get_sample_value("meshserve_queue_depth", labels) == 3
        assert repository.queue_depth("m") == 3
    finally:
        await repository.close()
        pool.shutdown(wait=True)
    for future in futures:  # failed as unavailable by the unload, none left hanging
        error = future.exception()
        assert isinstance(error, InferenceError) and error.code == grpc.StatusCode.UNAVAILABLE
