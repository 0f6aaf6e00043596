"""The KServe v2 RPCs other than ModelInfer, as the mesh answers them.

`ServerLive`/`ServerReady` speak for the mesh (ready: at least one passing
worker, and this gateway not draining); `ServerMetadata` names the gateway;
`ModelReady`/`ModelMetadata` go to a worker that serves the model version
(NOT_FOUND when nobody does).
Requests stay bytes where they are forwarded.
"""

from __future__ import annotations

import grpc

from gateway import wire
from gateway.auth import Authenticator, authenticate_call
from gateway.forwarding import DRAINING_MESSAGE, failure_status
from gateway.routes import RouteError, RouteTable
from gateway.upstream import Upstream
from loadbalancer.balancer import Balancer
from loadbalancer.endpoint import Endpoint
from loadbalancer.errors import AttemptFailed, NoEndpointAvailable
from meshserve.drain import DRAINING_METADATA, DrainGate
from protos import grpc_service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


class MeshServicer:
    def __init__(
        self, balancer: Balancer, routes: RouteTable, auth: Authenticator, gate: DrainGate, version: str
    ) -> None:
        self.balancer = balancer
        self.gate = gate
        self.routes = routes
        self.auth = auth
        self.version = version
        self.stopping = False  # set when the gateway begins to drain

    def ready(self) -> bool:
        return not self.stopping and bool(self.balancer.endpoints())

    async def server_live(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        await authenticate_call(self.auth, context)
        return pb.ServerMetadataResponse(name="meshserve", version=self.version, extensions=[])

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._routed("ModelReady", request, context)

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._routed("ModelMetadata", request, context)

    async def _routed(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        gate = self.gate
        if gate.draining:  # as ModelInfer: the drain waits until callers stop, then stops the server
            gate.refuse()
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, trailing_metadata=(DRAINING_METADATA,))
        gate.enter()
        try:
            return await self._forward(method, request, context)
        finally:
            gate.leave()

    async def _forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # ModelReadyRequest and ModelMetadataRequest share ModelInferRequest's
        # field numbers for name (1) and version (2).
        try:
            head = wire.scan_request(request)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method}Request: {exc}")
            raise
        await authenticate_call(self.auth, context, head.model_name)
        if not head.model_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        try:
            version = self.routes.resolve(head.model_name, head.model_version)
        except RouteError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise
        # The worker must answer for the version the route chose.
        forwarded = request + wire.encode_model_version(version) if not head.model_version else request

        async def attempt(endpoint: Endpoint, remaining: float | None) -> bytes:
            upstream: Upstream = endpoint.connection  # type: ignore[assignment]
            return await upstream.unary(method, forwarded, remaining)

        timeout = context.time_remaining()
        try:
            return await self.balancer.call(head.model_name, version, attempt, timeout=timeout or 10.0)
        except (AttemptFailed, NoEndpointAvailable, grpc.aio.AioRpcError, TimeoutError) as exc:
            code, message = failure_status(exc)
            await context.abort(code, message)
            raise
