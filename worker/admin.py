"""The one `meshserve.v1.MeshAdmin` method a worker answers: DrainWorker (the rest is the gateway's)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from protos import mesh_pb2, mesh_pb2_grpc


class WorkerAdminServicer(mesh_pb2_grpc.MeshAdminServicer):
    def __init__(self, begin_drain: Callable[[float | None], int]) -> None:
        self._begin_drain = begin_drain

    async def DrainWorker(
        self, request: mesh_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> mesh_pb2.DrainWorkerResponse:
        """Starts the drain (as SIGTERM does) and answers at once with the requests in flight."""
        in_flight = self._begin_drain(request.grace_seconds or None)
        return mesh_pb2.DrainWorkerResponse(in_flight=in_flight)
