"""One module per CLI command group. Each exposes `register(app)` and imports
heavy dependencies (onnxruntime, grpc servers) inside its command bodies so
that `meshserve --help` and light commands start fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def client_channel(url: str, tls_ca: Path | None) -> grpc.Channel:
    """A channel to a gateway or worker: TLS verified against `tls_ca` when given, else plaintext."""
    import grpc

    if tls_ca is not None:
        return grpc.secure_channel(url, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
    return grpc.insecure_channel(url)


def bearer(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key (none without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def freeze_startup_objects() -> None:
    """Moves every object alive after a server's start-up out of the cyclic GC's reach.

    Imports, protobuf descriptors, the gRPC server and the loaded models leave
    ~80,000 GC-tracked objects that live as long as the process, and each full
    collection walked them all: a busy gateway (mlp784, c=32) stopped for ~23 ms
    every second or two, every request in flight waiting; frozen, those pauses
    measured ~5 ms. Throughput did not change beyond this box's noise.
    Reference counting still frees them; only a cycle among them would now stay.
    """
    import gc

    gc.collect()
    gc.freeze()
