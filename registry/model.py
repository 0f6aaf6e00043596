"""What the rest of the mesh knows about a registered worker."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

MODEL_TAG_PREFIX = "model="
MESH_TAG = "meshserve"
SERVICE_NAME = "meshserve-worker"
# Gateways register too, under their own name: load balancers in front and Prometheus find them there.
GATEWAY_SERVICE_NAME = "meshserve-gateway"


def model_tag(name: str, version: str | int) -> str:
    """The tag that says a worker serves `name` at `version`."""
    return f"{MODEL_TAG_PREFIX}{name}:{version}"


@dataclass(frozen=True, order=True)
class ModelVersion:
    name: str
    version: str

    @classmethod
    def from_tag(cls, tag: str) -> ModelVersion | None:
        """Parses `model=<name>:<version>`; anything else is not a model tag."""
        if not tag.startswith(MODEL_TAG_PREFIX):
            return None
        name, sep, version = tag[len(MODEL_TAG_PREFIX) :].rpartition(":")
        if not sep or not name or not version:
            return None
        return cls(name, version)


@dataclass(frozen=True)
class ServiceInstance:
    """One registered endpoint. Hashable: `meta` is frozen into a read-only mapping."""

    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __hash__(self) -> int:
        return hash((self.id, self.address, self.port, self.tags, frozenset(self.meta.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServiceInstance):
            return NotImplemented
        return (self.id, self.address, self.port, self.tags, dict(self.meta)) == (
            other.id,
            other.address,
            other.port,
            other.tags,
            dict(other.meta),
        )

    @property
    def models(self) -> frozenset[ModelVersion]:
        return frozenset(mv for mv in map(ModelVersion.from_tag, self.tags) if mv is not None)

    @property
    def target(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def serves(self, name: str, version: str | None = None) -> bool:
        return any(mv.name == name and (version is None or mv.version == version) for mv in self.models)

    @classmethod
    def from_health_entry(cls, entry: Mapping[str, Any]) -> ServiceInstance:
        """From one element of `/v1/health/service/<name>`; the node address stands in for an empty service address."""
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        return cls(
            id=str(service.get("ID", "")),
            address=str(service.get("Address") or node.get("Address") or ""),
            port=int(service.get("Port") or 0),
            tags=tuple(service.get("Tags") or ()),
            meta={str(k): str(v) for k, v in (service.get("Meta") or {}).items()},
        )


@dataclass(frozen=True)
class EndpointChange:
    kind: Literal["added", "updated", "removed"]
    instance: ServiceInstance


def diff_instances(old: Mapping[str, ServiceInstance], new: Mapping[str, ServiceInstance]) -> list[EndpointChange]:
    """The changes that turn endpoint set `old` into `new`, removals first."""
    changes = [EndpointChange("removed", inst) for sid, inst in old.items() if sid not in new]
    for sid, inst in new.items():
        if sid not in old:
            changes.append(EndpointChange("added", inst))
        elif old[sid] != inst:
            changes.append(EndpointChange("updated", inst))
    return changes


def index_by_id(instances: Iterable[ServiceInstance]) -> dict[str, ServiceInstance]:
    return {inst.id: inst for inst in instances}
