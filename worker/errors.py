"""The one exception type that crosses the worker's layers: it carries the gRPC code for the edge."""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A request that cannot be served; `code` and the message go to the client as they are."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)
