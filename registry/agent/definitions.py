"""Validation of `PUT /v1/agent/service/register` bodies into service and check definitions.

Keys are matched as Consul matches them: case-insensitively, with the snake_case aliases
(`deregister_critical_service_after`) py-consul and Consul's docs use. Unknown keys are ignored,
as Consul's JSON decoder ignores them; wrong types and bad values are rejected with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from registry.agent.durations import DurationError, duration_seconds

CHECK_STATUSES = ("passing", "warning", "critical")
DEFAULT_CHECK_TIMEOUT_S = 10.0
MAX_META_KEYS = 64
MAX_META_KEY_LEN = 128
MAX_META_VALUE_LEN = 512
_UNSUPPORTED_CHECK_KINDS = ("http", "tcp", "args", "scriptargs", "script", "dockercontainerid", "h2ping", "udp")


class BadRequest(ValueError):
    """A request body or parameter the agent rejects with 400 and this reason."""


@dataclass
class CheckDefinition:
    check_id: str
    name: str
    kind: str  # "grpc" or "ttl"
    status: str = "critical"
    notes: str = ""
    grpc_target: str = ""
    grpc_service: str = ""
    grpc_use_tls: bool = False
    interval_s: float = 0.0
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S
    ttl_s: float = 0.0
    deregister_after_s: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServiceDefinition:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    enable_tag_override: bool
    weights: dict[str, int]
    checks: list[CheckDefinition]


def _fold(body: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key).replace("_", "").lower(): value for key, value in body.items()}


def _string(fields: Mapping[str, Any], key: str, label: str, default: str = "") -> str:
    value = fields.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"Request decode failed: {label} must be a string, got {type(value).__name__}")
    return value


def _boolean(fields: Mapping[str, Any], key: str, label: str) -> bool:
    value = fields.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"Request decode failed: {label} must be true or false")
    return value


def _duration(fields: Mapping[str, Any], key: str, label: str) -> float | None:
    value = fields.get(key)
    if value in (None, ""):
        return None
    try:
        seconds = duration_seconds(value)
    except DurationError as exc:
        raise BadRequest(f"Request decode failed: {label}: {exc}") from None
    if seconds < 0:
        raise BadRequest(f"Request decode failed: {label} must not be negative")
    return seconds


def _meta(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest("Request decode failed: Meta must be an object of strings")
    if len(value) > MAX_META_KEYS:
        raise BadRequest(
            f"Invalid Service Meta: Node metadata cannot contain more than {MAX_META_KEYS} key/value pairs"
        )
    meta: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadRequest(f"Request decode failed: Meta[{key!r}] must be a string")
        if not key or len(key) > MAX_META_KEY_LEN:
            raise BadRequest(f"Invalid Service Meta: Key is too long (limit: {MAX_META_KEY_LEN} characters)")
        if len(item) > MAX_META_VALUE_LEN:
            raise BadRequest(f"Invalid Service Meta: Value is too long (limit: {MAX_META_VALUE_LEN} characters)")
        meta[key] = item
    return meta


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise BadRequest("Request decode failed: Tags must be a list of strings")
    return list(value)


def _port(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise BadRequest(f"Request decode failed: Port must be an integer between 0 and 65535, got {value!r}")
    return value


def _weights(value: Any) -> dict[str, int]:
    weights = {"Passing": 1, "Warning": 1}
    if value is None:
        return weights
    if not isinstance(value, Mapping):
        raise BadRequest("Request decode failed: Weights must be an object")
    folded = _fold(value)
    for name in ("Passing", "Warning"):
        item = folded.get(name.lower(), weights[name])
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise BadRequest(f"Invalid weights: {name} must be a non-negative integer")
        weights[name] = item
    if weights["Passing"] < 1:
        raise BadRequest("Invalid weights: Passing must be greater than 0")
    return weights


def parse_check(body: Any, default_id: str, default_name: str, min_interval_s: float) -> CheckDefinition:
    """One check definition; `min_interval_s` clamps intervals as Consul's MinInterval does."""
    if not isinstance(body, Mapping):
        raise BadRequest("Request decode failed: a check must be a JSON object")
    fields = _fold(body)
    for kind in _UNSUPPORTED_CHECK_KINDS:
        if fields.get(kind):
            raise BadRequest(
                f"Invalid check: {kind.upper()} checks are not supported by the embedded agent (use GRPC or TTL)"
            )
    check_id = _string(fields, "checkid", "CheckID") or _string(fields, "id", "ID") or default_id
    status = _string(fields, "status", "Status") or "critical"
    if status not in CHECK_STATUSES:
        raise BadRequest(f"Invalid check status: {status!r} (use passing, warning or critical)")
    check = CheckDefinition(
        check_id=check_id,
        name=_string(fields, "name", "Name") or default_name,
        kind="",
        status=status,
        notes=_string(fields, "notes", "Notes"),
        deregister_after_s=_duration(fields, "deregistercriticalserviceafter", "DeregisterCriticalServiceAfter"),
        raw=dict(body),
    )
    ttl = _duration(fields, "ttl", "TTL")
    grpc_target = _string(fields, "grpc", "GRPC")
    if ttl is not None and grpc_target:
        raise BadRequest("Invalid check: give either TTL or GRPC, not both")
    if ttl is not None:
        if ttl <= 0:
            raise BadRequest("Invalid check: TTL must be > 0 for TTL checks")
        check.kind, check.ttl_s = "ttl", ttl
        return check
    if not grpc_target:
        raise BadRequest("Invalid check: one of TTL or GRPC (with Interval) must be given")
    target, _, service = grpc_target.partition("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise BadRequest(f"Invalid check: GRPC must be host:port[/service], got {grpc_target!r}")
    interval = _duration(fields, "interval", "Interval")
    if not interval:
        raise BadRequest("Invalid check: Interval must be > 0 for GRPC checks")
    timeout = _duration(fields, "timeout", "Timeout")
    check.kind = "grpc"
    check.grpc_target, check.grpc_service = target, service
    check.grpc_use_tls = _boolean(fields, "grpcusetls", "GRPCUseTLS")
    check.interval_s = max(interval, min_interval_s)
    check.timeout_s = timeout if timeout else DEFAULT_CHECK_TIMEOUT_S
    return check


def parse_service(body: Any, min_interval_s: float) -> ServiceDefinition:
    """A whole service registration body."""
    if not isinstance(body, Mapping):
        raise BadRequest("Request decode failed: the body must be a JSON object")
    fields = _fold(body)
    name = _string(fields, "name", "Name")
    if not name:
        raise BadRequest("Missing service name")
    service_id = _string(fields, "id", "ID") or name
    check_bodies: list[Any] = []
    if fields.get("check") is not None:
        check_bodies.append(fields["check"])
    if fields.get("checks") is not None:
        if not isinstance(fields["checks"], list):
            raise BadRequest("Request decode failed: Checks must be a list")
        check_bodies.extend(fields["checks"])
    default_id = f"service:{service_id}"
    checks = [
        parse_check(
            item,
            default_id if len(check_bodies) == 1 else f"{default_id}:{position}",
            f"Service '{name}' check",
            min_interval_s,
        )
        for position, item in enumerate(check_bodies, start=1)
    ]
    if len({check.check_id for check in checks}) != len(checks):
        raise BadRequest("Invalid check: duplicate CheckID in one registration")
    return ServiceDefinition(
        id=service_id,
        name=name,
        tags=_tags(fields.get("tags")),
        address=_string(fields, "address", "Address"),
        port=_port(fields.get("port")),
        meta=_meta(fields.get("meta")),
        enable_tag_override=_boolean(fields, "enabletagoverride", "EnableTagOverride"),
        weights=_weights(fields.get("weights")),
        checks=checks,
    )
