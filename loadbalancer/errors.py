"""The balancer's errors, and which failures are worth another attempt elsewhere."""

from __future__ import annotations

import grpc

# The worker's draining answer (docs/internals.md, "The gateway -> worker hop").
DRAINING_METADATA_KEY = "meshserve-draining"
DRAINING_MESSAGE_PREFIX = "worker is draining"


class AttemptFailed(Exception):
    """A worker-reported error for one attempt (e.g. read from a stream response).

    Attempt functions raise it when the failure did not arrive as a gRPC status
    of the call itself; the balancer treats it like an `AioRpcError` with `code`.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, draining: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.draining = draining


class NoEndpointAvailable(Exception):
    """No endpoint can take the request; the gateway answers UNAVAILABLE with this message."""

    def __init__(self, model: str, version: str, reason: str) -> None:
        super().__init__(f"{model}:{version}: {reason}")
        self.model = model
        self.version = version
        self.reason = reason


class Failure:
    """What one failed attempt means to the balancer: retry elsewhere? blame the endpoint?"""

    __slots__ = ("code", "connection", "details", "draining")

    def __init__(self, code: grpc.StatusCode | None, details: str, *, draining: bool, connection: bool) -> None:
        self.code = code
        self.details = details
        self.draining = draining
        self.connection = connection

    @property
    def retryable(self) -> bool:
        return self.draining or self.connection or self.code == grpc.StatusCode.UNAVAILABLE

    @property
    def outcome(self) -> str:
        """A short label for metrics and spans."""
        if self.draining:
            return "draining"
        if self.connection:
            return "connection_error"
        return self.code.name.lower() if self.code is not None else "error"

    def describe(self) -> str:
        return f"{self.code.name if self.code else 'ERROR'}: {self.details}"


def classify(exc: BaseException) -> Failure:
    """Reads an attempt's exception: gRPC status, worker-reported error, or a broken connection."""
    if isinstance(exc, AttemptFailed):
        draining = exc.draining or exc.details.startswith(DRAINING_MESSAGE_PREFIX)
        return Failure(exc.code, exc.details, draining=draining, connection=False)
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        draining = details.startswith(DRAINING_MESSAGE_PREFIX) or _draining_in(exc.trailing_metadata())
        # grpc.aio reports our own cancellations as asyncio.CancelledError, so a CANCELLED
        # status means the peer tore the call down (a worker stopping with calls in flight).
        torn_down = exc.code() == grpc.StatusCode.CANCELLED
        return Failure(exc.code(), details, draining=draining, connection=torn_down)
    if isinstance(exc, TimeoutError):
        return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", draining=False, connection=False)
    if isinstance(exc, ConnectionError | OSError):
        return Failure(grpc.StatusCode.UNAVAILABLE, f"connection failed: {exc}", draining=False, connection=True)
    return Failure(None, f"{type(exc).__name__}: {exc}", draining=False, connection=False)


def is_retryable(exc: BaseException) -> bool:
    return not isinstance(exc, NoEndpointAvailable) and classify(exc).retryable


def _draining_in(metadata: object) -> bool:
    if not metadata:
        return False
    try:
        return any(key == DRAINING_METADATA_KEY and str(value) in ("1", "true") for key, value in metadata)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
