"""Self-registration of a worker or gateway: register, stay registered through agent restarts, change tags, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

import consul
import consul.aio

try:
    from consul.exceptions import ACLPermissionDenied, BadRequest
except ImportError:  # py-consul before its `exceptions` module kept them in `base`
    from consul.base import ACLPermissionDenied, BadRequest  # type: ignore[no-redef]

from registry.agent.durations import parse_duration
from registry.blocking import Backoff, RegistryErrors
from registry.model import MESH_TAG, SERVICE_NAME
from registry.settings import RegistrySettings
from registry.url import connect, parse_registry_url

log = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The agent rejected the registration itself (not a transient failure): the message says why."""


def new_service_id(port: int) -> str:
    """`<hostname>-<port>-<random>`: unique per process even when a port is reused."""
    return f"{socket.gethostname()}-{port}-{secrets.token_hex(3)}"


@dataclass
class ServiceRegistration:
    """What a worker or gateway registers. The defaults drop a `kill -9`'ed worker out of `?passing` within ~2 s
    (1 s interval + 1 s timeout) and out of the catalog after 30 s."""

    service_id: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    check: Literal["grpc", "ttl"] = "grpc"
    name: str = SERVICE_NAME
    check_interval: str = "1s"
    check_timeout: str = "1s"
    deregister_after: str = "30s"
    ttl: str = "3s"

    @property
    def check_id(self) -> str:
        return f"service:{self.service_id}"

    def all_tags(self) -> list[str]:
        return [MESH_TAG, *(tag for tag in self.tags if tag != MESH_TAG)]

    def check_definition(self) -> dict[str, Any]:
        check: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": f"{self.name} health",
            "DeregisterCriticalServiceAfter": self.deregister_after,
        }
        if self.check == "ttl":
            check["TTL"] = self.ttl
        else:
            host = f"[{self.address}]" if ":" in self.address else self.address
            check.update(GRPC=f"{host}:{self.port}", Interval=self.check_interval, Timeout=self.check_timeout)
        return check

    def heartbeat_interval_s(self, resync_s: float) -> float:
        """How often the background loop runs: a third of the TTL in TTL mode, else the resync interval."""
        if self.check == "ttl":
            return min(resync_s, parse_duration(self.ttl) / 3)
        return resync_s


class SelfRegistration:
    """Keeps one service registered on a Consul agent for as long as the process lives."""

    def __init__(
        self, registry_url: str, registration: ServiceRegistration, *, settings: RegistrySettings | None = None
    ) -> None:
        self.registration = registration
        self._address = parse_registry_url(registry_url)
        self._settings = settings or RegistrySettings()
        self._client: consul.aio.Consul | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._draining = False
        self.registered = False
        self.registrations = 0  # how many times the service was (re-)registered, for logs and tests

    @property
    def _consul(self) -> consul.aio.Consul:
        if self._client is None:
            self._client = connect(self._address)
        return self._client

    async def _call(self, operation: Any) -> Any:
        async with asyncio.timeout(self._settings.registry_request_timeout_s):
            return await operation

    async def start(self) -> None:
        """Registers now (a rejected registration raises RegistrationError); an unreachable agent is retried
        in the background, as are heartbeats and re-registration after the agent forgets the service."""
        try:
            await self._register()
        except RegistryErrors as exc:
            log.warning(
                "registry unreachable; will register as %s once it answers",
                self.registration.service_id,
                extra={"registry": str(self._address), "error": f"{type(exc).__name__}: {exc}"},
            )
        self._task = asyncio.create_task(self._maintain(), name="registry-self-registration")

    async def _register(self) -> None:
        reg = self.registration
        async with self._lock:
            if self._draining:
                return
            try:
                await self._call(
                    self._consul.agent.service.register(
                        reg.name,
                        service_id=reg.service_id,
                        address=reg.address,
                        port=reg.port,
                        tags=reg.all_tags(),
                        meta=dict(reg.meta),
                        check=reg.check_definition(),
                        replace_existing_checks=True,
                    )
                )
            except (BadRequest, ACLPermissionDenied) as exc:
                raise RegistrationError(f"the registry rejected service {reg.service_id}: {exc}") from exc
            if reg.check == "ttl":
                await self._call(self._consul.agent.check.ttl_pass(reg.check_id, "registered"))
            self.registered = True
            self.registrations += 1
            log.info(
                "registered as %s",
                reg.service_id,
                extra={"service_id": reg.service_id, "registry": str(self._address), "tags": ",".join(reg.all_tags())},
            )

    async def _still_known(self) -> bool:
        """Heartbeat (TTL mode) and ask the agent whether it still has the service; False means re-register."""
        reg = self.registration
        if reg.check == "ttl" and not await self._call(self._consul.agent.check.ttl_pass(reg.check_id)):
            return False  # 404: the agent does not know the check (restarted, or reaped us)
        services = await self._call(self._consul.agent.services())
        return reg.service_id in (services or {})

    async def _maintain(self) -> None:
        interval = self.registration.heartbeat_interval_s(self._settings.registry_resync_interval_s)
        backoff = Backoff(self._settings.registry_backoff_initial_s, self._settings.registry_backoff_max_s)
        while not self._draining:
            try:
                if not self.registered or not await self._still_known():
                    if self.registered:
                        log.warning("the registry forgot this service; registering again")
                    self.registered = False
                    await self._register()
                backoff.reset()
                await asyncio.sleep(interval)
            except RegistrationError as exc:
                log.error("registration rejected", extra={"error": str(exc)})
                await asyncio.sleep(backoff.next_delay())
            except RegistryErrors as exc:
                log.warning("registry call failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(backoff.next_delay())

    async def set_tags(self, tags: list[str]) -> None:
        """Registers again with new tags (e.g. a hot-loaded model version). The check keeps its status."""
        self.registration.tags = list(tags)
        try:
            await self._register()
        except RegistryErrors as exc:
            self.registered = False  # the background loop registers the new tags when the agent is back
            log.warning("could not update tags now; will retry", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def drain(self) -> None:
        """Maintenance mode first (out of `?passing` at once), then deregister. Never raises: a worker that
        is stopping must not hang on an unreachable registry; the check then takes it out."""
        async with self._lock:
            self._draining = True
        await self._stop_task()
        reg = self.registration
        try:
            await self._call(self._consul.agent.service.maintenance(reg.service_id, True, "draining: shutting down"))
            await self._call(self._consul.agent.service.deregister(reg.service_id))
            log.info("deregistered from the registry", extra={"service_id": reg.service_id})
        except RegistryErrors as exc:
            log.warning("could not deregister cleanly", extra={"error": f"{type(exc).__name__}: {exc}"})
        self.registered = False

    async def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        """Stops heartbeats and resyncs and closes the connection (call `drain()` first to leave the registry)."""
        self._draining = True
        await self._stop_task()
        if self._client is not None:
            await self._client.close()
            self._client = None
