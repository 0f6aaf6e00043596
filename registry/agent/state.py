"""The agent's in-memory state: services, checks and KV, each change stamped with a raft-like index.

Every read view answers with the index of the last change it depends on, and `wait_for_change`
holds a blocking query until that index passes the client's (or the wait ends).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry.agent.definitions import CheckDefinition, ServiceDefinition
from registry.agent.durations import format_duration

MAINTENANCE_PREFIX = "_service_maintenance:"
DEFAULT_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)


@dataclass
class ServiceState:
    definition: ServiceDefinition
    create_index: int
    modify_index: int

    def agent_view(self, datacenter: str) -> dict[str, Any]:
        d = self.definition
        return {
            "ID": d.id,
            "Service": d.name,
            "Tags": list(d.tags),
            "Meta": dict(d.meta),
            "Port": d.port,
            "Address": d.address,
            "Weights": dict(d.weights),
            "EnableTagOverride": d.enable_tag_override,
            "Datacenter": datacenter,
        }

    def catalog_view(self) -> dict[str, Any]:
        d = self.definition
        return {
            "ID": d.id,
            "Service": d.name,
            "Tags": list(d.tags),
            "Address": d.address,
            "Meta": dict(d.meta),
            "Port": d.port,
            "Weights": dict(d.weights),
            "EnableTagOverride": d.enable_tag_override,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class CheckState:
    check_id: str
    name: str
    kind: str  # "grpc", "ttl", "maintenance", "serf"
    service_id: str
    service_name: str
    status: str
    output: str
    notes: str
    create_index: int
    modify_index: int
    definition: CheckDefinition | None = None
    # Runtime bookkeeping (monotonic seconds): when a TTL runs out, since when the check is critical.
    ttl_deadline: float | None = None
    critical_since: float | None = None
    generation: int = 0

    def view(self, node: str, service_tags: list[str]) -> dict[str, Any]:
        definition: dict[str, Any] = {}
        if self.definition is not None:
            d = self.definition
            if d.kind == "grpc":
                definition = {
                    "GRPC": d.grpc_target + (f"/{d.grpc_service}" if d.grpc_service else ""),
                    "GRPCUseTLS": d.grpc_use_tls,
                    "Interval": format_duration(d.interval_s),
                    "Timeout": format_duration(d.timeout_s),
                }
            else:
                definition = {"TTL": format_duration(d.ttl_s)}
            if d.deregister_after_s is not None:
                definition["DeregisterCriticalServiceAfter"] = format_duration(d.deregister_after_s)
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(service_tags),
            "Type": "" if self.kind in ("maintenance", "serf") else self.kind,
            "Definition": definition,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "Key": self.key,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "Flags": self.flags,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "LockIndex": self.lock_index,
        }


@dataclass
class AgentState:
    node: str
    address: str
    datacenter: str = "dc1"
    clock: Callable[[], float] = time.monotonic
    index: int = 1
    services: dict[str, ServiceState] = field(default_factory=dict)
    checks: dict[str, CheckState] = field(default_factory=dict)
    kv: dict[str, KVEntry] = field(default_factory=dict)
    kv_tombstones: dict[str, int] = field(default_factory=dict)
    service_name_index: dict[str, int] = field(default_factory=dict)
    catalog_index: int = 1
    kv_index: int = 1

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()
        self._closing = False

    def release_waiters(self) -> None:
        """Answers every held blocking query now (the agent is stopping) and holds no new ones."""
        self._closing = True
        self._notify()

    # -- change notification -------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _touch_service_name(self, name: str, index: int) -> None:
        self.service_name_index[name] = index
        self.catalog_index = index

    async def wait_for_change(self, view_index: Callable[[], int], min_index: int, wait_s: float) -> None:
        """Returns once `view_index()` exceeds `min_index`, or went backwards below it, or `wait_s` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while view_index() == min_index and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    # -- services and checks -------------------------------------------------------------------------------

    def register_service(self, definition: ServiceDefinition, replace_existing_checks: bool) -> None:
        index = self._bump()
        existing = self.services.get(definition.id)
        if existing is not None and existing.definition.name != definition.name:
            self._remove_service(definition.id, index)
            existing = None
        create_index = existing.create_index if existing else index
        self.services[definition.id] = ServiceState(definition, create_index, index)
        new_ids = {check.check_id for check in definition.checks}
        if replace_existing_checks:
            for check_id in [c.check_id for c in self._service_checks(definition.id) if c.check_id not in new_ids]:
                del self.checks[check_id]
        for check_def in definition.checks:
            self._add_check(definition, check_def, index)
        self._touch_service_name(definition.name, index)
        self._notify()

    def _add_check(self, service: ServiceDefinition, definition: CheckDefinition, index: int) -> None:
        old = self.checks.get(definition.check_id)
        now = self.clock()
        # Re-registering (new tags, agent resync) keeps a check's status, so a healthy service does not flap.
        keep = old is not None and old.kind == definition.kind and old.service_id == service.id
        status = old.status if keep and old is not None else definition.status
        check = CheckState(
            check_id=definition.check_id,
            name=definition.name,
            kind=definition.kind,
            service_id=service.id,
            service_name=service.name,
            status=status,
            output=old.output if keep and old is not None else "",
            notes=definition.notes,
            create_index=old.create_index if keep and old is not None else index,
            modify_index=index,
            definition=definition,
            critical_since=(old.critical_since if keep and old is not None else None),
            generation=(old.generation + 1 if old is not None else 0),
        )
        if status == "critical" and check.critical_since is None:
            check.critical_since = now
        if check.kind == "ttl":
            keep_deadline = keep and old is not None and old.ttl_deadline is not None
            check.ttl_deadline = old.ttl_deadline if keep_deadline and old is not None else now + definition.ttl_s
        self.checks[check.check_id] = check

    def _service_checks(self, service_id: str) -> list[CheckState]:
        return [check for check in self.checks.values() if check.service_id == service_id]

    def _remove_service(self, service_id: str, index: int) -> ServiceState | None:
        service = self.services.pop(service_id, None)
        if service is None:
            return None
        for check in self._service_checks(service_id):
            del self.checks[check.check_id]
        self._touch_service_name(service.definition.name, index)
        return service

    def deregister_service(self, service_id: str) -> bool:
        if service_id not in self.services:
            return False
        self._remove_service(service_id, self._bump())
        self._notify()
        return True

    def set_maintenance(self, service_id: str, enable: bool, reason: str) -> bool:
        service = self.services.get(service_id)
        if service is None:
            return False
        check_id = f"{MAINTENANCE_PREFIX}{service_id}"
        if enable == (check_id in self.checks):
            return True
        index = self._bump()
        if enable:
            self.checks[check_id] = CheckState(
                check_id=check_id,
                name="Service Maintenance Mode",
                kind="maintenance",
                service_id=service_id,
                service_name=service.definition.name,
                status="critical",
                output="",
                notes=reason or DEFAULT_MAINTENANCE_REASON,
                create_index=index,
                modify_index=index,
            )
        else:
            del self.checks[check_id]
        self._touch_service_name(service.definition.name, index)
        self._notify()
        return True

    def update_check(self, check_id: str, status: str, output: str) -> bool:
        """Sets a check's status; only a real change moves the index (and wakes blocking queries)."""
        check = self.checks.get(check_id)
        if check is None:
            return False
        now = self.clock()
        if check.kind == "ttl" and check.definition is not None:
            check.ttl_deadline = now + check.definition.ttl_s
        if check.status == status and check.output == output:
            return True
        if status == "critical" and check.status != "critical":
            check.critical_since = now
        elif status != "critical":
            check.critical_since = None
        index = self._bump()
        check.status, check.output, check.modify_index = status, output, index
        self._touch_service_name(check.service_name, index)
        self._notify()
        return True

    def expire_ttls(self) -> None:
        now = self.clock()
        for check in list(self.checks.values()):
            if check.kind == "ttl" and check.ttl_deadline is not None and now >= check.ttl_deadline:
                self.update_check(check.check_id, "critical", "TTL expired")
                check.ttl_deadline = None  # stays critical until the next heartbeat

    def reap_critical(self) -> list[str]:
        """Deregisters services with a check critical for longer than its DeregisterCriticalServiceAfter."""
        now = self.clock()
        reaped = []
        for check in list(self.checks.values()):
            definition = check.definition
            if (
                definition is not None
                and definition.deregister_after_s is not None
                and check.status == "critical"
                and check.critical_since is not None
                and now - check.critical_since >= definition.deregister_after_s
                and check.service_id in self.services
            ):
                self.deregister_service(check.service_id)
                reaped.append(check.service_id)
        return reaped

    # -- views ---------------------------------------------------------------------------------------------

    def _serf_check(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def service_view_index(self, name: str) -> int:
        return self.service_name_index.get(name, self.catalog_index)

    def health_service(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        node = {"ID": "", "Node": self.node, "Address": self.address, "Datacenter": self.datacenter, "Meta": {}}
        result = []
        for service in self.services.values():
            d = service.definition
            if d.name != name or not all(tag in d.tags for tag in tags):
                continue
            checks = [self._serf_check()] + [c.view(self.node, d.tags) for c in self._service_checks(d.id)]
            if passing and any(check["Status"] != "passing" for check in checks):
                continue
            result.append({"Node": dict(node), "Service": service.catalog_view(), "Checks": checks})
        return result

    def catalog_services(self) -> dict[str, list[str]]:
        catalog: dict[str, list[str]] = {"consul": []}
        for service in self.services.values():
            tags = catalog.setdefault(service.definition.name, [])
            tags.extend(tag for tag in service.definition.tags if tag not in tags)
        return catalog

    def agent_services(self) -> dict[str, dict[str, Any]]:
        return {sid: service.agent_view(self.datacenter) for sid, service in self.services.items()}

    def agent_checks(self) -> dict[str, dict[str, Any]]:
        views = {}
        for check in self.checks.values():
            service = self.services.get(check.service_id)
            views[check.check_id] = check.view(self.node, service.definition.tags if service else [])
        return views

    # -- KV ------------------------------------------------------------------------------------------------

    def kv_view_index(self, key: str, recurse: bool) -> int:
        if not recurse:
            entry = self.kv.get(key)
            if entry is not None:
                return entry.modify_index
            return self.kv_tombstones.get(key, self.kv_index)
        indexes = [e.modify_index for k, e in self.kv.items() if k.startswith(key)]
        indexes += [i for k, i in self.kv_tombstones.items() if k.startswith(key)]
        return max(indexes, default=self.kv_index)

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return [self.kv[key] for key in sorted(self.kv) if key.startswith(prefix)]

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        existing = self.kv.get(key)
        if cas is not None and (
            (cas == 0 and existing is not None) or (cas != 0 and (existing is None or existing.modify_index != cas))
        ):
            return False
        index = self._bump()
        create = existing.create_index if existing else index
        self.kv[key] = KVEntry(key, value, flags, create, index)
        self.kv_tombstones.pop(key, None)
        self.kv_index = index
        self._notify()
        return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        if recurse:
            doomed = [k for k in self.kv if k.startswith(key)]
        else:
            entry = self.kv.get(key)
            if cas is not None and (entry is None or entry.modify_index != cas):
                return cas == 0 and entry is None
            doomed = [key] if entry is not None else []
        if not doomed:
            return True
        index = self._bump()
        for k in doomed:
            del self.kv[k]
            self.kv_tombstones[k] = index
        self.kv_index = index
        self._notify()
        return True
