"""Runs the embedded agent: HTTP API, check runner, and an optional Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from aiohttp import web
from prometheus_client import CollectorRegistry

from registry.agent.checks import CheckRunner
from registry.agent.http import AgentAPI, build_app
from registry.agent.state import AgentState
from registry.metrics import AgentMetrics
from registry.settings import AgentSettings

log = logging.getLogger(__name__)


def _advertised(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


class EmbeddedAgent:
    """One agent: start() binds and serves, stop() tears it down."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.state = AgentState(
            node=settings.node_name or socket.gethostname(),
            address=_advertised(settings.registry_host),
            datacenter=settings.datacenter,
        )
        self._runner = CheckRunner(self.state, settings.registry_sweep_interval_s)
        self._web: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = settings.registry_port

    async def start(self) -> None:
        api = AgentAPI(self.state, "", self.settings.registry_min_check_interval_s)
        self._web = web.AppRunner(build_app(api), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._web.setup()
        site = web.TCPSite(self._web, self.settings.registry_host, self.settings.registry_port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only here
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api.leader = f"{_advertised(self.settings.registry_host)}:{self.port}"
        self._tasks.append(asyncio.create_task(self._runner.run()))
        if self.settings.metrics_port is not None:
            self._tasks.append(asyncio.create_task(self._publish_metrics()))
        log.info(
            "registry agent listening on http://%s:%d",
            self.settings.registry_host,
            self.port,
            extra={"port": self.port},
        )

    async def _publish_metrics(self) -> None:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        metrics = AgentMetrics(registry)
        server, _ = start_http_server(
            self.settings.metrics_port or 0, addr=self.settings.registry_host, registry=registry
        )
        log.info("metrics on port %d", server.server_port, extra={"metrics_port": server.server_port})
        try:
            while True:
                metrics.observe(self.state)
                await asyncio.sleep(1.0)
        finally:
            server.shutdown()

    async def stop(self) -> None:
        self.state.release_waiters()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._web is not None:
            await self._web.cleanup()


async def serve(settings: AgentSettings) -> None:
    """Serves until SIGINT or SIGTERM."""
    agent = EmbeddedAgent(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        log.info("registry agent stopping")
        await agent.stop()
