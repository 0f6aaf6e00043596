"""`ModelStreamInfer` on the public port: tritonclient's streaming API through the gateway.

Each request on a client's stream goes the same way as a unary `ModelInfer`
(admission, routing, balancer, multiplexed hop) and is answered on the stream
as soon as it completes, so answers may come out of order; they carry the
client's ids. A failed request is answered with `error_message` and does not
end the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from gateway import wire
from gateway.forwarding import InferenceForwarder, RequestRefused, failure_status, metadata_value
from loadbalancer.errors import AttemptFailed, NoEndpointAvailable

log = logging.getLogger(__name__)


class StreamForwarder:
    def __init__(self, forwarder: InferenceForwarder) -> None:
        self.forwarder = forwarder
        self._open: set[Callable[[], None]] = set()  # one per open stream: ends it once its requests are answered

    def close_all(self) -> None:
        """The gateway drains: each open stream ends once the requests it has read are answered.

        Requests read meanwhile are answered too (refused as draining), so none goes unanswered
        on a stream the client still sees open."""
        for close in tuple(self._open):
            close()

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        metadata = context.invocation_metadata()
        traceparent = metadata_value(metadata, "traceparent")
        write_lock = asyncio.Lock()  # one outstanding write per call
        in_flight: set[asyncio.Task[None]] = set()
        closing = asyncio.Event()  # the client closed its side, or the gateway drains
        loop = asyncio.get_running_loop()

        async def answer(request: bytes) -> None:
            message = await self._one(request, metadata, traceparent, context)
            async with write_lock:
                await context.write(message)

        async def read() -> None:
            try:
                async for request in requests:
                    task = loop.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            except Exception as exc:  # the client's side broke: answer what was read, then end
                log.debug("reading a ModelStreamInfer stream ended: %r", exc)
            finally:
                closing.set()

        if self.forwarder.gate.draining:
            closing.set()
        self._open.add(closing.set)
        reader = loop.create_task(read())
        try:
            await closing.wait()
            while in_flight:  # the reader may still add requests read while the others finish
                await asyncio.gather(*in_flight, return_exceptions=True)
        finally:
            self._open.discard(closing.set)
            reader.cancel()
            for task in in_flight:
                task.cancel()

    async def _one(
        self,
        request: bytes,
        metadata: tuple[tuple[str, str | bytes], ...] | None,
        traceparent: str | None,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        forwarder = self.forwarder
        started = time.perf_counter()
        model = "_unknown"
        code = "OK"
        request_id = b""
        forwarder.gate.enter()
        try:
            with contextlib.suppress(wire.WireError):
                request_id = wire.scan_request(request).id
            head = forwarder.admit(request, metadata)
            model = head.model_name
            timeout = context.time_remaining() or forwarder.default_timeout_s
            response = await forwarder.forward(request, head, metadata, timeout, traceparent)
            return wire.encode_stream_response(response + wire.encode_id(head.id))
        except RequestRefused as refused:
            code = refused.code.name
            return wire.encode_stream_error(refused.message, request_id)
        except (AttemptFailed, NoEndpointAvailable, grpc.aio.AioRpcError, TimeoutError) as exc:
            status, message = failure_status(exc)
            code = status.name
            return wire.encode_stream_error(message, request_id)
        except Exception:
            code = "INTERNAL"
            log.exception("unexpected error forwarding a streamed request", extra={"model": model})
            return wire.encode_stream_error("internal gateway error", request_id)
        finally:
            forwarder.gate.leave()
            forwarder.metrics.observe(model, code, time.perf_counter() - started)
