"""The gateway process: public gRPC server, registry watchers, balancer, auth.

Composition only; each behaviour lives in its own module (forwarding, streaming,
servicer, auth, ratelimit, routes, upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from gateway.admin import MeshAdminServicer
from gateway.auth import AuthConfig, Authenticator, AuthFileWatcher, single_key_config
from gateway.forwarding import InferenceForwarder
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.registration import GatewayRegistration
from gateway.routes import RouteTable, parse_routes
from gateway.servicer import SERVICE, MeshServicer
from gateway.settings import GatewaySettings
from gateway.streaming import StreamForwarder
from gateway.upstream import Upstream, UpstreamOptions
from loadbalancer.balancer import Balancer, ModelPolicy
from loadbalancer.metrics import BalancerMetrics
from loadbalancer.settings import BalancerSettings
from meshserve.busywait import BusyWait, LightLoadPoll
from meshserve.drain import FLUSH_GRACE_S, DrainGate
from protos import grpc_service_pb2 as pb
from protos import mesh_pb2_grpc
from protos._pool import POOL
from registry.address import advertised_address
from registry.discovery import KVWatcher, ServiceWatcher
from registry.metrics import RegistryMetrics
from registry.model import ServiceInstance

log = logging.getLogger(__name__)

ADMIN_SERVICE = "meshserve.v1.MeshAdmin"


class PortInUse(RuntimeError):
    """The public port could not be bound."""


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def worker_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    """TLS (mTLS with a client certificate) to workers, when a CA is configured."""
    if settings.worker_tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.worker_tls_ca),
        private_key=_read(settings.worker_tls_key),
        certificate_chain=_read(settings.worker_tls_cert),
    )


def _proto_handler(
    behaviour: object, request_cls: type, response_cls: type
) -> grpc.RpcMethodHandler:  # typed RPCs: small messages
    return grpc.unary_unary_rpc_method_handler(
        behaviour,  # type: ignore[arg-type]
        request_deserializer=request_cls.FromString,
        response_serializer=response_cls.SerializeToString,
    )


class Gateway:
    """Start with `await start()`; on SIGTERM `await drain()`, which stops it; `await stop()` stops it at once."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        metrics_registry: CollectorRegistry | None = None,
        balancer_settings: BalancerSettings | None = None,
        version: str = "0",
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.metrics_port = metrics_port  # advertised in the registry, for Prometheus
        registry = metrics_registry or CollectorRegistry()
        self.metrics = GatewayMetrics(registry)
        # The registry client's own metrics (meshserve_registry_stale{watch}, errors, updates).
        self.registry_metrics = RegistryMetrics(registry)
        self.auth = Authenticator(None)
        self._auth_watcher: AuthFileWatcher | None = None
        self.limiter = RateLimiter()
        self._upstream_options = UpstreamOptions(
            streams=settings.streams_per_worker,
            max_message_bytes=settings.max_message_bytes,
            credentials=worker_credentials(settings),
            busy_wait_s=settings.hop_busy_wait_us / 1e6,
        )
        self._busy_wait = BusyWait()  # one event loop: one count of who is waiting on it
        self.balancer_settings = balancer_settings or BalancerSettings()
        self.balancer = Balancer(self.balancer_settings, self._connect, metrics=BalancerMetrics(registry))
        self.routes = RouteTable(self.balancer.versions)
        self.gate = DrainGate()
        self.forwarder = InferenceForwarder(
            self.balancer,
            self.routes,
            self.auth,
            self.limiter,
            self.metrics,
            self.gate,
            default_timeout_s=settings.default_timeout_s,
            poll=LightLoadPoll(self._busy_wait, settings.light_load_poll_us / 1e6)
            if settings.light_load_poll_us
            else None,
        )
        self.streams = StreamForwarder(self.forwarder)
        self.servicer = MeshServicer(self.balancer, self.routes, self.auth, self.gate, version)
        self.health = health.aio.HealthServicer()
        self._workers: ServiceWatcher | None = None
        self._kv: KVWatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Set once the first read of the workers and of the routes has been applied.
        self._workers_read = asyncio.Event()
        self._routes_read = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.registration: GatewayRegistration | None = None
        self._stopped = False
        self.port = 0

    def _connect(self, instance: ServiceInstance) -> Upstream:
        return Upstream(instance.target, self._upstream_options, self._busy_wait)

    def _load_auth(self) -> None:
        settings = self.settings
        extra = single_key_config(settings.api_key) if settings.api_key else None
        if settings.auth_file is not None:
            self._auth_watcher = AuthFileWatcher(
                settings.auth_file, self.auth, interval=settings.auth_reload_interval_s, extra=extra
            )
            config: AuthConfig = self._auth_watcher.load()
            log.info("auth file %s: %d tenant(s)", settings.auth_file, len(config.tenants))
        elif extra is not None:
            self.auth.replace(extra)
        else:
            log.warning("no --auth-file or --api-key: the gateway accepts requests WITHOUT authentication")

    def _build_server(self) -> grpc.aio.Server:
        options = [
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            # Several processes may share the port only when asked; otherwise a
            # port in use must be an error, not a silent share.
            ("grpc.so_reuseport", 1 if self.settings.processes > 1 else 0),
        ]
        server = grpc.aio.server(options=options)
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.forwarder.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.streams.model_stream_infer),
            "ModelReady": grpc.unary_unary_rpc_method_handler(self.servicer.model_ready),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(self.servicer.model_metadata),
            "ServerLive": _proto_handler(self.servicer.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": _proto_handler(self.servicer.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": _proto_handler(
                self.servicer.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        settings = self.settings
        admin = MeshAdminServicer(self.balancer, self.routes, self.auth, settings.registry, settings.routes_prefix)
        mesh_pb2_grpc.add_MeshAdminServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server, pool=POOL)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.settings.tls_cert is not None or self.settings.tls_key is not None:
                if self.settings.tls_cert is None or self.settings.tls_key is None:
                    raise ValueError("--tls-cert and --tls-key go together")
                credentials = grpc.ssl_server_credentials(
                    [(self.settings.tls_key.read_bytes(), self.settings.tls_cert.read_bytes())]
                )
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PortInUse(
                f"cannot listen on {address}: the port is in use or not allowed; choose another with --port"
            ) from exc
        if self.port == 0 and self.settings.port != 0:
            raise PortInUse(f"cannot listen on {address}: the port is in use; choose another with --port")
        return server

    async def start(self) -> int:
        self._load_auth()
        self._server = self._build_server()  # binds the port: one in use fails here, before anything waits
        await self._set_health(False)
        loop = asyncio.get_running_loop()
        self._workers = ServiceWatcher(self.settings.registry, metrics=self.registry_metrics)
        self._kv = KVWatcher(self.settings.registry, self.settings.routes_prefix, metrics=self.registry_metrics)
        self._tasks = [
            loop.create_task(self._watch_workers(self._workers), name="watch-workers"),
            loop.create_task(self._watch_routes(self._kv), name="watch-routes"),
        ]
        await self._wait_for_first_registry_read()
        await self._server.start()
        if self._auth_watcher is not None:
            self._auth_watcher.start()
        if self.settings.self_register:
            settings = self.settings
            self.registration = GatewayRegistration(
                settings.registry,
                advertised_address(settings.host, settings.advertise_address),
                self.port,
                self.metrics_port,
                settings.processes,
                tls=settings.tls_cert is not None,
            )
            await self.registration.start()
        scheme = "TLS" if self.settings.tls_cert else "plaintext"
        log.info("gateway serving on %s:%d (%s), registry %s", self.settings.host, self.port, scheme,
                 self.settings.registry)  # fmt: skip
        return self.port

    async def _wait_for_first_registry_read(self) -> None:
        """A gateway that answered before it knew the workers would say NOT_FOUND for every model; with
        `--processes N`, SO_REUSEPORT hands such a process new connections while its siblings serve."""
        limit = self.settings.registry_first_read_s
        try:
            await asyncio.wait_for(asyncio.gather(self._workers_read.wait(), self._routes_read.wait()), limit)
        except TimeoutError:
            log.warning("registry %s not read within %g s: serving anyway; no model is found until it answers",
                        self.settings.registry, limit)  # fmt: skip

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def _watch_workers(self, watcher: ServiceWatcher) -> None:
        ready = False
        async for changes in watcher:
            self.balancer.apply(changes)
            self.routes.endpoints_changed()
            for change in changes:
                log.info("worker %s %s (%s)", change.instance.target, change.kind,
                         ", ".join(sorted(f"{m.name}:{m.version}" for m in change.instance.models)))  # fmt: skip
            now_ready = self.servicer.ready()
            if now_ready != ready:
                ready = now_ready
                await self._set_health(ready)
                log.info("mesh %s", "ready" if ready else "has no passing worker")
            self._workers_read.set()

    async def _watch_routes(self, watcher: KVWatcher) -> None:
        prefix = watcher.prefix
        async for snapshot in watcher:
            routes = parse_routes(snapshot, prefix)
            previous = self.routes.routes
            self.routes.replace(routes)
            for model in set(previous) | set(routes):
                route = routes.get(model)
                policy = ModelPolicy(
                    policy=(route.policy if route and route.policy else self.balancer_settings.policy),
                    hash_header=route.hash_header if route else None,
                    hedge=route.hedge if route else False,
                )
                try:
                    self.balancer.set_model_policy(model, policy)
                except (ValueError, KeyError) as exc:
                    log.error("route for %s names an unknown policy: %s", model, exc, extra={"model": model})
            log.info("routes: %s", {m: dict(r.weights) for m, r in routes.items()} or "none (newest versions serve)")
            self._routes_read.set()

    async def drain(self) -> None:
        """NOT_SERVING, deregister, keep serving for the drain delay, refuse new requests, let the ones
        in flight finish and callers stop sending (within the drain grace), stop."""
        settings = self.settings
        started = time.monotonic()
        self.servicer.stopping = True  # ServerReady says no, and a change of workers cannot undo NOT_SERVING
        log.info("draining: %d requests in flight; serving %.1fs more, grace %.1fs",
                 self.gate.in_flight, settings.drain_delay, settings.drain_grace)  # fmt: skip
        with contextlib.suppress(Exception):
            await self._set_health(False)
        if self.registration is not None:
            await self.registration.drain()
        # Load balancers in front (health checks, DNS, the registry) need a moment to stop
        # picking this gateway; requests on their way are still served meanwhile.
        await asyncio.sleep(settings.drain_delay)
        self.gate.begin()
        self.streams.close_all()
        await self.gate.settle(started + settings.drain_grace, log)
        await self.stop(FLUSH_GRACE_S)
        log.info("drained and stopped in %.2fs; refused %d requests while draining",
                 time.monotonic() - started, self.gate.refusals)  # fmt: skip

    async def stop(self, grace: float = FLUSH_GRACE_S) -> None:
        """Stops serving, cancelling what is still in flight after `grace` seconds; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self.servicer.stopping = True
        with contextlib.suppress(Exception):
            await self._set_health(False)
        if self.registration is not None:
            await self.registration.drain()  # done already when the drain ran
        if self._server is not None:
            await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for watcher in (self._workers, self._kv):
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.close()
        if self._auth_watcher is not None:
            await self._auth_watcher.close()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.close()
        await self.balancer.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
