"""The agent's own health checking: gRPC probes on their interval, TTL expiry, critical-service reaping."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry.agent.definitions import CheckDefinition
from registry.agent.state import AgentState

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
# A probe is one attempt: no transparent retries, no waiting for a connection that is not there.
_PROBE_CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.max_reconnect_backoff_ms", 1000)]


async def grpc_probe(definition: CheckDefinition) -> tuple[str, str]:
    """One grpc.health.v1 Check call: (status, output) as Consul reports them."""
    target = definition.grpc_target
    label = f"gRPC check {target}" + (f"/{definition.grpc_service}" if definition.grpc_service else "")
    if definition.grpc_use_tls:
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=_PROBE_CHANNEL_OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(target, options=_PROBE_CHANNEL_OPTIONS)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=definition.grpc_service)
        reply = await stub.Check(request, timeout=definition.timeout_s)
    except grpc.aio.AioRpcError as exc:
        # The code, not the detail text: the output must stay the same while the state does, or every
        # probe would move the index and wake every blocking query.
        return "critical", f"{label}: failed with error: rpc error: code = {exc.code().name}"
    finally:
        await channel.close()
    if reply.status == _SERVING:
        return "passing", f"{label}: success"
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "critical", f"{label}: failed with status {status_name}"


class CheckRunner:
    """Keeps one probe task per gRPC check, and sweeps TTLs and DeregisterCriticalServiceAfter."""

    def __init__(self, state: AgentState, sweep_interval_s: float) -> None:
        self._state = state
        self._sweep_interval_s = sweep_interval_s
        self._probes: dict[str, tuple[int, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        try:
            while True:
                self.sweep()
                await asyncio.sleep(self._sweep_interval_s)
        finally:
            await self.close()

    def sweep(self) -> None:
        self._state.expire_ttls()
        for service_id in self._state.reap_critical():
            log.info("deregistered critical service", extra={"service_id": service_id})
        self._sync_probes()

    def _sync_probes(self) -> None:
        wanted = {
            check.check_id: check
            for check in self._state.checks.values()
            if check.kind == "grpc" and check.definition is not None
        }
        for check_id, (generation, task) in list(self._probes.items()):
            check = wanted.get(check_id)
            if check is None or check.generation != generation:
                task.cancel()
                del self._probes[check_id]
        for check_id, check in wanted.items():
            if check_id not in self._probes and check.definition is not None:
                task = asyncio.create_task(self._probe_loop(check_id, check.generation, check.definition))
                self._probes[check_id] = (check.generation, task)

    async def _probe_loop(self, check_id: str, generation: int, definition: CheckDefinition) -> None:
        while True:
            try:
                status, output = await grpc_probe(definition)
            except Exception as exc:  # a probe must never take the agent down
                log.warning("gRPC probe failed unexpectedly", extra={"check_id": check_id, "error": repr(exc)})
                status, output = (
                    "critical",
                    f"gRPC check {definition.grpc_target}: failed with error: {type(exc).__name__}",
                )
            check = self._state.checks.get(check_id)
            if check is None or check.generation != generation:
                return
            self._state.update_check(check_id, status, output)
            await asyncio.sleep(definition.interval_s)

    async def close(self) -> None:
        tasks = [task for _, task in self._probes.values()]
        self._probes.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
