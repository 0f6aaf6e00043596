"""`meshserve.v1.MeshAdmin` on the gateway's port: what this gateway balances over, and the routes.

ListWorkers and ListModels answer from the balancer's view (the registry's
passing workers, plus last-known ones while it is unreachable); GetRoute and
SetRoute read and write the routing config in the registry's KV store, the
same keys and check-and-set as `meshserve model rollout`, and every gateway
applies a change within a second. Each call needs a credential, as inference
does; SetRoute needs a tenant marked `admin: true` (`meshserve keys create
--admin`; the single `--api-key` is one). DrainWorker is a worker's own RPC.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from gateway.auth import Authenticator, authenticate_call
from gateway.routes import Route, RouteConflict, RouteTable, read_route, version_order, with_weights, write_route
from loadbalancer.balancer import Balancer
from loadbalancer.endpoint import Endpoint
from protos import mesh_pb2, mesh_pb2_grpc
from registry.blocking import RegistryErrors

Context = grpc.aio.ServicerContext


def worker_message(endpoint: Endpoint) -> mesh_pb2.Worker:
    load = endpoint.load
    return mesh_pb2.Worker(
        id=endpoint.id,
        address=endpoint.target,
        models=[f"{mv.name}:{mv.version}" for mv in sorted(endpoint.instance.models)],
        state=endpoint.state.value,
        meta=dict(endpoint.instance.meta),
        in_flight=load.pending,  # this gateway's requests on it
        queue_depth=load.outstanding() - load.pending,  # the worker's last report of everyone else's
    )


def model_summaries(endpoints: Iterable[Endpoint]) -> list[mesh_pb2.ModelSummary]:
    served: dict[str, dict[str, set[str]]] = {}  # model -> version -> endpoint ids
    for endpoint in endpoints:
        for model in endpoint.instance.models:
            served.setdefault(model.name, {}).setdefault(model.version, set()).add(endpoint.id)
    return [
        mesh_pb2.ModelSummary(
            name=name,
            versions=sorted(versions, key=version_order),
            workers=len(set().union(*versions.values())),
        )
        for name, versions in sorted(served.items())
    ]


def route_message(model: str, route: Route | None) -> mesh_pb2.Route:
    return mesh_pb2.Route(model=model, weights=dict(route.weights) if route else {})


class MeshAdminServicer(mesh_pb2_grpc.MeshAdminServicer):
    def __init__(
        self, balancer: Balancer, routes: RouteTable, auth: Authenticator, registry_url: str, routes_prefix: str
    ) -> None:
        self.balancer = balancer
        self.routes = routes
        self.auth = auth
        self.registry_url = registry_url
        self.routes_prefix = routes_prefix

    async def ListWorkers(self, request: mesh_pb2.ListWorkersRequest, context: Context) -> mesh_pb2.ListWorkersResponse:
        await authenticate_call(self.auth, context)
        endpoints = sorted(self.balancer.endpoints(), key=lambda endpoint: endpoint.target)
        return mesh_pb2.ListWorkersResponse(workers=[worker_message(endpoint) for endpoint in endpoints])

    async def ListModels(self, request: mesh_pb2.ListModelsRequest, context: Context) -> mesh_pb2.ListModelsResponse:
        await authenticate_call(self.auth, context)
        return mesh_pb2.ListModelsResponse(models=model_summaries(self.balancer.endpoints()))

    async def GetRoute(self, request: mesh_pb2.GetRouteRequest, context: Context) -> mesh_pb2.Route:
        """The route this gateway applies now; no weights: none is set, the newest served version answers."""
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        await authenticate_call(self.auth, context, request.model)
        return route_message(request.model, self.routes.route(request.model))

    async def SetRoute(self, request: mesh_pb2.SetRouteRequest, context: Context) -> mesh_pb2.Route:
        """Replaces the model's weights (its policy settings stay); `meshserve model rollback` undoes it."""
        model = request.route.model
        if not model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "route.model is required")
        tenant = await authenticate_call(self.auth, context, model)
        if not tenant.admin:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may not change routes; give it 'admin: true' in the auth file",
            )
        unserved = sorted(set(request.route.weights) - self.balancer.versions(model))
        if unserved:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no worker serves {model} version(s) {', '.join(unserved)}; publish them before routing to them",
            )
        try:
            with_weights(None, request.route.weights)  # weights that route nothing fail here, before any registry call
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            current, index = await read_route(self.registry_url, self.routes_prefix, model)
            route = with_weights(current, request.route.weights)
            await write_route(self.registry_url, self.routes_prefix, model, route, index)
        except RouteConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except RegistryErrors as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the registry did not take the route: {exc}")
        return route_message(model, route)

    async def DrainWorker(self, request: mesh_pb2.DrainWorkerRequest, context: Context) -> mesh_pb2.DrainWorkerResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "DrainWorker is a worker's RPC: call it on the worker's own address (ListWorkers lists them)",
        )
        raise AssertionError("unreachable: abort raises")
