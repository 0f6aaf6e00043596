"""Every registered instance of a service with its health, for operators (`meshserve status`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from registry.agent.state import MAINTENANCE_PREFIX
from registry.model import SERVICE_NAME, ServiceInstance
from registry.settings import RegistrySettings
from registry.url import connect, parse_registry_url

_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class InstanceHealth:
    instance: ServiceInstance
    status: str  # passing, warning, critical, or maintenance
    output: str
    queue_depth: float | None = None  # from the instance's /metrics (Meta metrics_port), when it answers

    @property
    def passing(self) -> bool:
        return self.status == "passing"


async def list_instances(
    registry_url: str, service: str = SERVICE_NAME, *, settings: RegistrySettings | None = None
) -> list[InstanceHealth]:
    """All instances (passing or not), sorted by address, with their aggregated check status."""
    settings = settings or RegistrySettings()
    client = connect(parse_registry_url(registry_url))
    try:
        async with asyncio.timeout(settings.registry_request_timeout_s):
            _, entries = await client.health.service(service)
    finally:
        await client.close()
    result = []
    for entry in entries or []:
        checks = entry.get("Checks") or []
        status, output = "passing", ""
        for check in checks:
            check_status = str(check.get("Status", "critical"))
            if _SEVERITY.get(check_status, 2) > _SEVERITY[status]:
                status, output = check_status, str(check.get("Output") or check.get("Notes") or "")
        if any(str(check.get("CheckID", "")).startswith(MAINTENANCE_PREFIX) for check in checks):
            status = "maintenance"
            output = next(
                str(c.get("Notes", "")) for c in checks if str(c.get("CheckID")).startswith(MAINTENANCE_PREFIX)
            )
        result.append(InstanceHealth(ServiceInstance.from_health_entry(entry), status, output))
    depths = await asyncio.gather(*(queue_depth(health.instance) for health in result))
    result = [replace(health, queue_depth=depth) for health, depth in zip(result, depths, strict=True)]
    return sorted(result, key=lambda health: (health.instance.target, health.instance.id))


async def queue_depth(instance: ServiceInstance, timeout_s: float = 1.0) -> float | None:
    """Requests waiting in the instance's batch queues (`meshserve_queue_depth`), or None if unknown."""
    port = instance.meta.get("metrics_port", "")
    if not port.isdigit() or int(port) == 0:
        return None
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(f"http://{host}:{port}/metrics") as response,
        ):
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    samples = [s.value for f in families if f.name == "meshserve_queue_depth" for s in f.samples]
    return sum(samples) if samples else None
