"""The default connector: one reused HTTP/2 channel per endpoint, with keepalive.

The gateway passes its own connector (a stream multiplexer per endpoint);
this one serves tests, benchmarks and simple unary clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from registry.model import ServiceInstance

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Keepalive finds a dead peer on an idle channel (a worker killed with -9
    # sends no FIN when its host vanishes) within seconds, not minutes.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a worker restarts on the same address.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # One channel per endpoint, never shared with another balancer's channel.
    ("grpc.use_local_subchannel_pool", 1),
)


class GrpcConnection:
    """An insecure `grpc.aio` channel to one endpoint."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))

    async def close(self) -> None:
        await self.channel.close(grace=None)


def grpc_connector(instance: ServiceInstance) -> GrpcConnection:
    return GrpcConnection(instance.target)
