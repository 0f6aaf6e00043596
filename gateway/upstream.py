"""The gateway's connection to one worker: a channel and a few multiplexed, coalescing streams.

A unary call costs several times the CPU of one message on an open stream
(DESIGN.md, performance notes), so requests to a worker travel over a small
pool of long-lived `meshserve.v1.WorkerHop/InferStream` streams. Each request
gets a hop id (appended to its bytes); the worker echoes it, and a reader task
per stream hands each response to the request waiting for that id.

Per stream, a writer task sends what is queued as one `InferBatch`. Before a
write it lets the gateway's event loop run whatever else is ready
(`meshserve.busywait`, at most `busy_wait_s`): under load that is mostly
other requests on their way to this stream, so they share the message; on an
idle gateway nothing is ready and the request goes out at once. Requests that
arrive while a write is in flight go out together when it completes. The
worker coalesces its responses the same way.

A request whose caller gives up (cancelled, or its deadline passed) is named
in the next message's `cancelled` list, so the worker drops it rather than
spend a batch slot on an answer nobody reads.

A stream that breaks fails all of its in-flight requests with a retryable
UNAVAILABLE, so the balancer fails them over to another worker; the next
request opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from dataclasses import dataclass

import grpc

from gateway import wire
from loadbalancer.errors import AttemptFailed
from meshserve.busywait import BusyWait

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
HOP_METHOD = "/meshserve.v1.WorkerHop/InferStream"
# Pings more often than the server's min_recv_ping_interval (5 min by
# default) count as abuse and end in GOAWAY; a killed worker is noticed at
# once through its closed socket anyway.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.enable_retries", 0),
]
_WRITE_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError)


# Requests per InferBatch at most, however busy the loop: bounds one message's size and wait.
MAX_ENTRIES_PER_MESSAGE = 64


@dataclass(frozen=True)
class UpstreamOptions:
    streams: int = 2
    max_message_bytes: int = 64 * 1024 * 1024
    credentials: grpc.ChannelCredentials | None = None  # mTLS to workers; None: plaintext
    busy_wait_s: float = 0.0  # the longest a write waits for requests the gateway is still receiving


class _Stream:
    """One `InferStream` call, the requests waiting on it and those queued for its next write."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self.call = upstream._stream_method()
        self.pending: dict[bytes, asyncio.Future[wire.ResponseHead]] = {}
        self.broken = False
        # gRPC allows one outstanding write per call, and cancelling a write
        # cancels the whole call: so requests never write themselves (a client
        # that gives up must not fail the stream's other requests). They queue
        # their envelope parts; the writer sends each accumulation as one message.
        self.writing = False  # a message is being formed or written: new requests join the next one
        self._queued: list[bytes] = []
        self._entries = 0  # requests in _queued
        self._wakeup: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        # Fresh contexts: these tasks outlive the request that opened the stream and must not carry its span.
        name = upstream.target
        self._reader = loop.create_task(self._read(), name=f"upstream-read {name}", context=contextvars.Context())
        self._writer = loop.create_task(self._write(), name=f"upstream-write {name}", context=contextvars.Context())

    def send(self, request: bytes, tail: bytes) -> None:
        """Queues `request + tail` as one InferBatch entry for the next write.

        A broken stream fails the request's future instead of raising here.
        """
        self._queued += (wire.batch_entry_header(len(request) + len(tail)), request, tail)
        self._entries += 1
        self._wake_writer()

    def cancel(self, hop_id: bytes) -> None:
        """Tells the worker, with the next write, that nobody waits for `hop_id` any more."""
        if self.broken:
            return
        self._queued.append(wire.cancel_entry(hop_id))
        self._wake_writer()

    def _wake_writer(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)

    def _full(self) -> bool:
        return self._entries >= MAX_ENTRIES_PER_MESSAGE

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        queued = self._queued
        upstream = self._upstream
        busy_wait_s = upstream.options.busy_wait_s
        try:
            while True:
                if not queued:
                    self.writing = False
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
                self.writing = True
                if busy_wait_s:
                    await upstream.busy_wait.while_busy(loop.time() + busy_wait_s, self._full)
                message = b"".join(queued)
                queued.clear()
                self._entries = 0
                await self.call.write(message)
        except _WRITE_ERRORS as exc:
            self._break(f"could not send to worker {self._upstream.target}: {_describe(exc)}")
        except Exception as exc:  # a writer that dies silently would leave its requests waiting for their deadline
            log.exception("writing to worker %s failed", self._upstream.target)
            self._break(f"could not send to worker {self._upstream.target}: {_describe(exc)}")

    async def _read(self) -> None:
        reason = "stream ended"
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                pending = self.pending
                for start, end in wire.batch_entries(message):
                    head = wire.scan_response(message, start, end)
                    future = pending.pop(head.id, None)
                    if future is not None and not future.done():
                        future.set_result(head)
        except grpc.aio.AioRpcError as exc:
            reason = _describe(exc)
        except wire.WireError as exc:
            reason = f"unreadable response: {exc}"
            self.call.cancel()
        except asyncio.CancelledError:
            reason = "connection closed"
            raise
        finally:
            self._break(f"stream to worker {self._upstream.target} broke: {reason}")

    def _break(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = True
        self._queued.clear()
        self._writer.cancel()
        self._upstream._forget(self)
        pending, self.pending = self.pending, {}
        if pending:
            log.warning("%s; failing over %d request(s)", reason, len(pending))
        for future in pending.values():
            if not future.done():
                future.set_exception(AttemptFailed(grpc.StatusCode.UNAVAILABLE, reason))

    async def close(self) -> None:
        self.call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class Upstream:
    """What the gateway's connector returns for an endpoint (the balancer's `Connection`)."""

    def __init__(self, target: str, options: UpstreamOptions | None = None, busy_wait: BusyWait | None = None) -> None:
        self.target = target
        self.options = options or UpstreamOptions()
        self.busy_wait = busy_wait or BusyWait()  # the gateway shares one among all its upstreams
        channel_options = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_send_message_length", self.options.max_message_bytes),
            ("grpc.max_receive_message_length", self.options.max_message_bytes),
        ]
        if self.options.credentials is not None:
            self.channel = grpc.aio.secure_channel(target, self.options.credentials, options=channel_options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options)
        # No (de)serializers: bytes in, bytes out.
        self._stream_method = self.channel.stream_stream(HOP_METHOD)
        self._unary = {
            name: self.channel.unary_unary(SERVICE + name) for name in ("ModelMetadata", "ModelReady", "ModelInfer")
        }
        self._streams: list[_Stream] = []
        self._ids = itertools.count(1)
        self._closed = False

    def _forget(self, stream: _Stream) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)

    def _pick(self) -> _Stream:
        streams = self._streams
        if len(streams) < self.options.streams:
            if self._closed:
                raise AttemptFailed(grpc.StatusCode.UNAVAILABLE, f"connection to worker {self.target} is closed")
            stream = _Stream(self)
            streams.append(stream)
            return stream
        best = streams[0]
        for stream in streams:
            if stream.writing:
                return stream  # joining the next message of a write in flight costs no write of its own
            if len(stream.pending) < len(best.pending):
                best = stream
        return best

    async def infer(self, request: bytes, extra: bytes, timeout_s: float | None) -> wire.ResponseHead:
        """Sends a serialized ModelInferRequest (+ appended `extra` fields) and waits for its response.

        Raises AttemptFailed(UNAVAILABLE) when the stream breaks, TimeoutError
        when `timeout_s` passes first.
        """
        stream = self._pick()
        hop_id = b"%x" % next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[wire.ResponseHead] = loop.create_future()
        stream.pending[hop_id] = future
        timer = loop.call_later(timeout_s, _expire, future) if timeout_s is not None else None
        try:
            stream.send(request, wire.encode_id(hop_id) + extra)
            return await future
        except (asyncio.CancelledError, TimeoutError):
            if hop_id in stream.pending:  # still unanswered: let the worker drop it instead of running it
                stream.cancel(hop_id)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            stream.pending.pop(hop_id, None)

    async def unary(self, method: str, request: bytes, timeout_s: float | None) -> bytes:
        """A unary call with raw bytes (metadata RPCs; they are rare)."""
        return await self._unary[method](request, timeout=timeout_s)

    async def close(self) -> None:
        self._closed = True
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.close()
        await self.channel.close()


def _expire(future: asyncio.Future[wire.ResponseHead]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("deadline exceeded waiting for the worker"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
