"""The least a Python gRPC proxy can do: a grpc.aio generic handler forwarding each call's bytes as one unary call.

    python -m bench.bare_proxy --port P --upstream HOST:PORT

No auth, no balancing, no streams, no parsing: what it adds on top of the
upstream's latency is the floor of a grpc.aio hop on this machine, the number
the gateway's own hop is compared with (`bench/transport_floor.py`).
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

READY_LINE = "BARE PROXY READY"


class ForwardEverything(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        call = self.calls.get(method)
        if call is None:
            call = self.calls[method] = self.channel.unary_unary(method)  # bytes in, bytes out

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await call(request, timeout=context.time_remaining())

        return grpc.unary_unary_rpc_method_handler(forward)


async def serve(port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ForwardEverything(channel),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(READY_LINE, flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
