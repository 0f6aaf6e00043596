"""The dynamic batcher: one per model version.

Requests wait in a bounded queue; each model instance takes what is queued
(up to the max batch size, only requests whose non-batch dims agree), runs
ONNX Runtime in a thread pool and splits the outputs back per request. While
one batch runs, the next one forms. A model whose largest batch runs in
microseconds runs on the event loop's thread instead (`OnnxModel.runs_inline`):
the hand-off to a thread and back costs more than the run. A batch that fails is retried request by
request, so one bad request never fails its neighbours. A run nobody waits
for any more (every request in it cancelled, or the model unloaded) is
stopped at ONNX Runtime's next operator rather than finished.

Without a queue delay, a batch still waits while the event loop has other
work ready (`_wait_while_receiving`, `meshserve.busywait`): under load that
work is mostly the next requests arriving, so the batch takes them along
instead of leaving at size 1. On an idle worker nothing is ready and the
request runs at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from meshserve.busywait import BusyWait
from worker.errors import InferenceError
from worker.metrics import ModelMetrics
from worker.runtime import OnnxModel, instance_cores
from worker.tensors import encode_output
from worker.wakeup import Wakeup

log = logging.getLogger(__name__)
tracer = trace.get_tracer("meshserve.worker")


@dataclass(slots=True, eq=False)
class Job:
    """One validated request waiting for a batch."""

    inputs: list[np.ndarray]  # in the model's input order
    rows: int  # size of dim 0 (1 for a model that is not batched)
    output_indices: list[int]
    future: asyncio.Future[JobResult]
    deadline: float | None = None  # loop.time() after which running it is pointless
    span_context: SpanContext | None = None  # the request's server span, when it is recorded
    enqueued_ns: int = field(default_factory=time.time_ns)

    @property
    def key(self) -> tuple[tuple[int, ...], ...]:
        """Jobs can share a batch only when every input agrees beyond dim 0."""
        return tuple(array.shape[1:] for array in self.inputs)


@dataclass(slots=True)
class JobResult:
    outputs: list[np.ndarray]  # the requested outputs, in request order
    raw: list[bytes]  # the same, encoded for raw_output_contents
    batch_size: int


def _run_error(model: OnnxModel, exc: Exception) -> InferenceError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, ort_errors.InvalidArgument) else grpc.StatusCode.INTERNAL
    return InferenceError(code, f"model '{model.name}' version {model.version} failed to run: {first_line}")


def _fail(jobs: Iterable[Job], error: InferenceError) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


class Batcher:
    def __init__(
        self,
        model: OnnxModel,
        executor: Executor,
        metrics: ModelMetrics,
        tracing: bool = False,
        busy_wait: BusyWait | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.metrics = metrics
        self.tracing = tracing
        self.busy_wait = busy_wait or BusyWait()
        config = model.config
        self.max_rows = model.max_batch_size if model.batchable else 1
        self.max_queue_size = config.max_queue_size
        self.max_delay = config.max_queue_delay_us / 1e6
        self.max_busy_wait = config.max_busy_wait_us / 1e6 if self.max_rows > 1 else 0.0
        self.preferred = config.preferred_batch_sizes if model.batchable else []
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_rows = 0  # rows in _queue, cancelled jobs included until a batch skips them
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup: Wakeup | None = None  # started by the first queue-delay wait
        self._own_executors: list[ThreadPoolExecutor] = []  # one per pinned instance
        self.running = 0  # jobs inside ONNX Runtime right now

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        model = self.model
        cores = sorted(os.sched_getaffinity(0)) if model.pinned else []
        for index in range(model.config.instance_count):
            name = f"batcher {model.name}:{model.version}#{index}"
            executor = self.executor
            if cores:
                # One thread per instance, pinned: a run stays on its cores from start to end.
                pinned = instance_cores(index, model.intra_op_threads, cores)
                executor = ThreadPoolExecutor(
                    1, f"ort-{model.name}-{index}", initializer=os.sched_setaffinity, initargs=(0, pinned)
                )
                self._own_executors.append(executor)
                log.info(
                    "model %s version %d instance %d runs on cores %s",
                    model.name,
                    model.version,
                    index,
                    ",".join(map(str, sorted(pinned))),
                    extra={"model": f"{model.name}:{model.version}"},
                )
            self._tasks.append(asyncio.get_running_loop().create_task(self._serve(executor), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for executor in self._own_executors:
            executor.shutdown(wait=False)  # a cancelled run stops at ONNX Runtime's next operator
        self._own_executors.clear()
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        _fail(self._queue, InferenceError(grpc.StatusCode.UNAVAILABLE, "model was unloaded"))
        self._queue.clear()
        self._queued_rows = 0

    def submit(self, job: Job) -> asyncio.Future[JobResult]:
        """Queues a validated job; RESOURCE_EXHAUSTED at once when the queue is full."""
        if len(self._queue) >= self.max_queue_size:
            raise InferenceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model '{self.model.name}' version {self.model.version}: queue is full "
                f"({self.max_queue_size} requests waiting); retry later or add workers",
            )
        self._queue.append(job)
        self._queued_rows += job.rows
        self._arrived.set()
        return job.future

    async def _serve(self, executor: Executor) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_delay:
                await self._wait_for_more()
            elif self.max_busy_wait:
                await self._wait_while_receiving()
            batch = self._take()
            if not batch:
                continue
            try:
                await self._execute(batch, executor)
            except asyncio.CancelledError:  # stopped (unloaded) mid-run: nobody may wait forever
                _fail(batch, InferenceError(grpc.StatusCode.UNAVAILABLE, "model was unloaded"))
                raise
            except Exception:  # a bug here must fail this batch, not stop the model for good
                log.exception("batch for %s:%s failed", self.model.name, self.model.version)
                _fail(
                    batch, InferenceError(grpc.StatusCode.INTERNAL, "internal error in the batcher; see the worker log")
                )

    async def _wait_for_more(self) -> None:
        """Waits up to the max queue delay (from the oldest request) for a full or preferred batch."""
        loop = asyncio.get_running_loop()
        oldest = self._queue[0]
        until = loop.time() + self.max_delay - (time.time_ns() - oldest.enqueued_ns) / 1e9
        if self._wakeup is None:
            self._wakeup = Wakeup(loop, self._arrived.set, name=f"batch-delay {self.model.name}")
        while True:
            rows = self._queued_rows
            if rows >= self.max_rows or rows in self.preferred:
                return
            if until - loop.time() <= 0:
                return
            # Woken by a new request or by the deadline (asyncio's own timers would add up to 1 ms).
            self._arrived.clear()
            self._wakeup.at(until)
            await self._arrived.wait()

    async def _wait_while_receiving(self) -> None:
        """Lets the requests the worker is receiving right now join this batch (`meshserve.busywait`)."""
        until = asyncio.get_running_loop().time() + self.max_busy_wait
        until -= (time.time_ns() - self._queue[0].enqueued_ns) / 1e9  # from the oldest request's arrival
        await self.busy_wait.while_busy(until, self._full)

    def _full(self) -> bool:
        return self._queued_rows >= self.max_rows

    def _take(self) -> list[Job]:
        """The next batch: the oldest live job and the queued jobs that fit with it."""
        now = asyncio.get_running_loop().time()
        batch: list[Job] = []
        leftover: collections.deque[Job] = collections.deque()
        rows, key = 0, None
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # the caller went away (cancelled)
                continue
            if job.deadline is not None and now > job.deadline:
                job.future.set_exception(
                    InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while the request was queued")
                )
                continue
            if key is None:
                key = job.key
            if job.key != key or rows + job.rows > self.max_rows:
                leftover.append(job)
                if rows >= self.max_rows:
                    break
                continue
            batch.append(job)
            rows += job.rows
            if rows >= self.max_rows:
                break
        leftover.extend(self._queue)
        self._queue = leftover
        if self.preferred and rows not in self.preferred:
            self._trim_to_preferred(batch, rows)
        self._queued_rows = sum(job.rows for job in self._queue)
        return batch

    def _trim_to_preferred(self, batch: list[Job], rows: int) -> None:
        """Shrinks the batch to the largest preferred size it can hit exactly; the rest go back first in line."""
        target = max((size for size in self.preferred if size <= rows), default=None)
        if target is None:
            return
        kept_rows, cut = rows, len(batch)
        while cut > 1 and kept_rows > target:
            cut -= 1
            kept_rows -= batch[cut].rows
        if kept_rows == target:
            self._queue.extendleft(reversed(batch[cut:]))
            del batch[cut:]

    async def _execute(self, batch: list[Job], executor: Executor) -> None:
        size = sum(job.rows for job in batch)
        self.running += len(batch)
        span = None
        if self.tracing and any(job.span_context is not None for job in batch):  # a batch of sampled requests
            span = self._trace_batch(batch, size)
        try:
            if self.model.runs_inline:
                outcomes = self._run(batch, size, span, None)
            else:
                outcomes = await self._run_in_executor(executor, batch, size, span)
        except Exception as exc:  # never let the batching loop die
            log.exception("batch of %d for %s:%s failed", size, self.model.name, self.model.version)
            outcomes = [_run_error(self.model, exc)] * len(batch)
        finally:
            self.running -= len(batch)
            if span is not None:
                span.end()
        self.metrics.batch_size.observe(size)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, InferenceError):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    async def _run_in_executor(
        self, executor: Executor, batch: list[Job], size: int, span: trace.Span | None
    ) -> list[JobResult | InferenceError]:
        """The run in a thread, stopped early (ONNX Runtime's terminate flag) once nobody waits for it:
        every request of the batch cancelled, or the model unloaded. A multi-second batch whose
        clients all gave up would otherwise hold its instance (and a core) until it finished."""
        options = ort.RunOptions()
        running = True

        def abandon_if_nobody_waits(_: asyncio.Future[JobResult]) -> None:
            # A callback already scheduled when the run ended still comes: `running` tells.
            if running and not options.terminate and all(job.future.done() for job in batch):
                self._abandon(options, "every request in the batch was cancelled")

        for job in batch:
            job.future.add_done_callback(abandon_if_nobody_waits)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._run, batch, size, span, options)
        except asyncio.CancelledError:  # unloaded mid-run
            self._abandon(options, "the model is being unloaded")
            raise
        finally:
            running = False
            for job in batch:
                job.future.remove_done_callback(abandon_if_nobody_waits)

    def _abandon(self, options: ort.RunOptions, why: str) -> None:
        options.terminate = True
        log.info(
            "stopping a run of %s:%s: %s",
            self.model.name,
            self.model.version,
            why,
            extra={"model": f"{self.model.name}:{self.model.version}"},
        )

    def _trace_batch(self, batch: list[Job], size: int) -> trace.Span:
        for job in batch:
            if job.span_context is not None:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(job.span_context))
                tracer.start_span("worker.queue_wait", context=parent, start_time=job.enqueued_ns).end()
        links = [Link(job.span_context) for job in batch if job.span_context is not None]
        attributes = {"meshserve.batch_size": size}
        if self.model.padded_batch_size:
            attributes["meshserve.padded_batch_size"] = self.model.padded_batch_size
        return tracer.start_span("worker.batch", links=links, attributes=attributes)

    # The methods below run in the executor thread (on the loop's thread for an inline model).

    def _run(
        self, batch: list[Job], size: int, span: trace.Span | None, options: ort.RunOptions | None
    ) -> list[JobResult | InferenceError]:
        try:
            return self._run_together(batch, size, span, options)
        except Exception as exc:
            if options is not None and options.terminate:  # stopped on purpose: nobody waits for it
                self.metrics.abandoned_runs.inc()
                return [_run_error(self.model, exc)] * len(batch)
            if len(batch) == 1:
                return [_run_error(self.model, exc)]
        # One of them broke the run: run each alone so only that one fails.
        outcomes: list[JobResult | InferenceError] = []
        for job in batch:
            try:
                outcomes.extend(self._run_together([job], job.rows, span, options))
            except Exception as exc:
                outcomes.append(_run_error(self.model, exc))
        return outcomes

    def _run_together(
        self, batch: list[Job], size: int, span: trace.Span | None, options: ort.RunOptions | None
    ) -> list[JobResult]:
        model = self.model
        if len(batch) == 1:
            arrays: Sequence[np.ndarray] = batch[0].inputs
        else:
            arrays = [np.concatenate([job.inputs[i] for job in batch]) for i in range(len(model.inputs))]
        feeds = {spec.name: array for spec, array in zip(model.inputs, arrays, strict=True)}
        if span is None:
            outputs = model.run(feeds, options)
        else:
            # Not made current: nothing inside creates spans, and on the event loop's
            # thread (an inline model) attaching a context per batch is measurable.
            run_span = tracer.start_span("ort.run", context=trace.set_span_in_context(span))
            try:
                outputs = model.run(feeds, options)
            except Exception as exc:
                run_span.record_exception(exc)
                run_span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                run_span.end()
        results: list[JobResult] = []
        start = 0
        for job in batch:
            if len(batch) == 1:
                chosen = [outputs[i] for i in job.output_indices]
            else:
                chosen = [outputs[i][start : start + job.rows] for i in job.output_indices]
                start += job.rows
            raw = [
                encode_output(array, model.outputs[i].datatype)
                for array, i in zip(chosen, job.output_indices, strict=True)
            ]
            results.append(JobResult(chosen, raw, size))
        return results
