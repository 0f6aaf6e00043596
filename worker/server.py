"""The worker process, composed: repository, engine, gRPC server (inference, health, reflection,
admin), /metrics, self-registration, and the graceful drain on SIGTERM/SIGINT or DrainWorker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.drain import FLUSH_GRACE_S
from meshserve.telemetry import MetricsServer, process_registry, start_metrics_server
from protos import grpc_service_pb2_grpc, mesh_pb2_grpc
from protos._pool import POOL
from registry.address import advertised_address
from worker.admin import WorkerAdminServicer
from worker.engine import InferenceEngine
from worker.metrics import WorkerMetrics
from worker.registration import WorkerRegistration
from worker.repository import ModelRepository
from worker.servicer import InferenceServicer
from worker.settings import WorkerSettings
from worker.watcher import RepositoryWatcher

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
ADMIN_SERVICE = "meshserve.v1.MeshAdmin"


def server_credentials(settings: WorkerSettings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is configured; client certificates required with a client CA."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class WorkerServer:
    def __init__(self, settings: WorkerSettings, tracing: bool = False) -> None:
        self.settings = settings
        self.tracing = tracing
        self.metrics = WorkerMetrics(process_registry())
        # ORT runs and model loads; threads start lazily, so the cap only bounds instance_count sums.
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ort")
        self.repository = ModelRepository(settings.model_repository, self.executor, self.metrics, tracing=tracing)
        self.engine = InferenceEngine(self.repository, self.metrics, settings.inject_latency_ms, tracing=tracing)
        self.servicer = InferenceServicer(self.engine)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_server: MetricsServer | None = None
        self.registration: WorkerRegistration | None = None
        self.watcher: RepositoryWatcher | None = None
        self._server: grpc.aio.Server | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        settings = self.settings
        await self.repository.load_all()
        if not self.repository.served():
            log.warning("no model could be loaded from %s; serving none", settings.model_repository)
        size = settings.max_message_size
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
            ]
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        mesh_pb2_grpc.add_WorkerHopServicer_to_server(self.servicer, server)  # the gateway's batched hop
        mesh_pb2_grpc.add_MeshAdminServicer_to_server(WorkerAdminServicer(self.begin_drain), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server, pool=POOL
        )
        bind = f"{settings.host}:{settings.port}"
        try:
            credentials = server_credentials(settings)
            if credentials is None:
                self.port = server.add_insecure_port(bind)
            else:
                self.port = server.add_secure_port(bind, credentials)
        except OSError as exc:
            raise RuntimeError(f"cannot read the TLS files: {exc}") from None
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
        await server.start()
        self._server = server
        self.metrics_server = start_metrics_server(self.metrics.registry, settings.metrics_port, settings.host)
        address = advertised_address(settings.host, settings.advertise_address)
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("worker serving on %s:%d", address, self.port, extra={"port": self.port})
        if settings.registry:
            self.registration = WorkerRegistration(
                settings.registry, address, self.port, self.metrics_server.port, self.repository, tls=settings.tls
            )
            await self.registration.start()
            self.repository.on_change(self._tags_changed)
        if settings.watch_interval > 0:
            self.watcher = RepositoryWatcher(self.repository, settings.watch_interval, settings.unload_drain)
            self.watcher.start()
        self._started.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.begin_drain, None)

    def begin_drain(self, grace: float | None = None) -> int:
        """Starts the drain once (later calls are no-ops); returns the requests in flight now."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(grace))
        return self.engine.in_flight

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, deregister, keep serving for the propagation delay, refuse new work,
        let in-flight and queued requests finish within the grace period, wait until callers
        have stopped sending (within the same grace), stop."""
        settings = self.settings
        grace = settings.drain_grace if grace is None else grace
        await self._started.wait()  # a signal during model loading drains once serving began
        started = time.monotonic()
        log.info("draining: %d requests in flight, grace %.1fs", self.engine.in_flight, grace)
        try:
            await self.health.enter_graceful_shutdown()
            if self.registration is not None:
                try:
                    await self.registration.drain()
                except Exception:
                    log.exception("could not deregister; the registry's health check will drop this worker")
            # Balancers (registry watchers, health checkers) need a moment to stop picking
            # this worker; requests already on their way are still served meanwhile.
            await asyncio.sleep(settings.drain_delay)
            gate = self.engine.gate
            gate.begin()
            self.servicer.stop_streams()
            await gate.settle(started + grace, log)
            if self._server is not None:
                await self._server.stop(FLUSH_GRACE_S)
            await self.close()
            log.info(
                "drained and stopped in %.2fs; refused %d requests while draining",
                time.monotonic() - started,
                gate.refusals,
            )
        finally:
            self._stopped.set()

    async def close(self) -> None:
        """Releases everything; safe to call more than once."""
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        if self._server is not None:
            await self._server.stop(0)
        await self.repository.close()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.close()
            self.registration = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _tags_changed(self) -> None:
        if self.registration is not None:
            task = asyncio.get_running_loop().create_task(self.registration.update_tags())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not update registry tags: %s", task.exception())
