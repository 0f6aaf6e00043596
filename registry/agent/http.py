"""The agent's HTTP API: Consul's paths, field names, status codes and headers (consul-api.md).

Bad input answers with Consul's status code and a plain-text reason; an unexpected error answers
500 and is logged, and the agent keeps serving.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from registry.agent.definitions import BadRequest, parse_service
from registry.agent.durations import DurationError, parse_duration
from registry.agent.state import AgentState

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
JITTER_FRACTION = 16
MAX_KV_VALUE_BYTES = 512 * 1024


class NotFound(LookupError):
    """Answers 404 with this reason."""


def _text(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason if reason.endswith("\n") else reason + "\n")


@web.middleware
async def consul_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return _text(400, str(exc))
    except NotFound as exc:
        return _text(404, str(exc))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _text(500, "Internal error in the embedded agent; see its log")


def _json(data: Any, index: int | None = None) -> web.Response:
    headers = {}
    if index is not None:
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
    return web.Response(text=json.dumps(data), content_type="application/json", headers=headers)


def _bool_param(request: web.Request, name: str) -> bool:
    """Consul's flags: present and empty means true, else a Go bool literal."""
    if name not in request.query:
        return False
    value = request.query.get(name, "").strip().lower()
    if value in ("", "1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise BadRequest(f"Invalid value for {name}: {request.query.get(name)!r} (use true or false)")


def _uint_param(request: web.Request, name: str) -> int | None:
    if name not in request.query:
        return None
    raw = request.query.get(name, "")
    if not raw.isdigit() or int(raw) >= 2**64:
        raise BadRequest(f"Invalid {name}: {raw!r} is not an unsigned integer")
    return int(raw)


def _blocking(request: web.Request) -> tuple[int, float]:
    """(index, seconds to hold) from `?index=&wait=`: wait defaults to 5m, is capped at 10m, plus wait/16 jitter."""
    index = _uint_param(request, "index") or 0
    wait_s = DEFAULT_WAIT_S
    if "wait" in request.query:
        try:
            wait_s = parse_duration(request.query["wait"])
        except DurationError as exc:
            raise BadRequest(f"Invalid wait time: {exc}") from None
        if wait_s <= 0:
            wait_s = DEFAULT_WAIT_S
    wait_s = min(wait_s, MAX_WAIT_S)
    return index, wait_s + random.uniform(0, wait_s / JITTER_FRACTION)


class AgentAPI:
    """Request handlers over one `AgentState`."""

    def __init__(self, state: AgentState, leader: str, min_check_interval_s: float) -> None:
        self.state = state
        self.leader = leader
        self.min_check_interval_s = min_check_interval_s

    def routes(self) -> list[web.RouteDef]:
        return [
            web.put("/v1/agent/service/register", self.register_service),
            web.put("/v1/agent/service/deregister/{service_id:.+}", self.deregister_service),
            web.put("/v1/agent/service/maintenance/{service_id:.+}", self.maintenance),
            web.get("/v1/agent/services", self.agent_services),
            web.get("/v1/agent/service/{service_id:.+}", self.agent_service),
            web.get("/v1/agent/checks", self.agent_checks),
            web.put("/v1/agent/check/pass/{check_id:.+}", self.ttl_update),
            web.put("/v1/agent/check/warn/{check_id:.+}", self.ttl_update),
            web.put("/v1/agent/check/fail/{check_id:.+}", self.ttl_update),
            web.get("/v1/health/service/{name:.+}", self.health_service),
            web.get("/v1/catalog/services", self.catalog_services),
            web.get("/v1/status/leader", self.status_leader),
            web.get("/v1/status/peers", self.status_peers),
            web.get("/v1/kv/{key:.*}", self.kv_get),
            web.put("/v1/kv/{key:.*}", self.kv_put),
            web.delete("/v1/kv/{key:.*}", self.kv_delete),
        ]

    # -- agent ---------------------------------------------------------------------------------------------

    async def register_service(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None
        definition = parse_service(body, self.min_check_interval_s)
        self.state.register_service(definition, _bool_param(request, "replace-existing-checks"))
        log.info("registered service", extra={"service_id": definition.id, "service": definition.name})
        return web.Response(status=200)

    async def deregister_service(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        if not self.state.deregister_service(service_id):
            raise NotFound(
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
            )
        log.info("deregistered service", extra={"service_id": service_id})
        return web.Response(status=200)

    async def maintenance(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        if "enable" not in request.query:
            raise BadRequest("Missing value for enable")
        enable = _bool_param(request, "enable")
        if not self.state.set_maintenance(service_id, enable, request.query.get("reason", "")):
            raise NotFound(f'Unknown service ID "{service_id}"')
        return web.Response(status=200)

    async def agent_services(self, request: web.Request) -> web.Response:
        return _json(self.state.agent_services())

    async def agent_service(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        service = self.state.agent_services().get(service_id)
        if service is None:
            raise NotFound(f'unknown service ID: "{service_id}"')
        return _json(service)

    async def agent_checks(self, request: web.Request) -> web.Response:
        return _json(self.state.agent_checks())

    async def ttl_update(self, request: web.Request) -> web.Response:
        check_id = request.match_info["check_id"]
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[request.path.split("/")[4]]
        check = self.state.checks.get(check_id)
        if check is None or check.kind != "ttl":
            raise NotFound(f'CheckID "{check_id}" does not have associated TTL')
        self.state.update_check(check_id, status, request.query.get("note", ""))
        return web.Response(status=200)

    # -- health and catalog --------------------------------------------------------------------------------

    async def health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        passing = _bool_param(request, "passing")
        tags = request.query.getall("tag", [])
        index, wait_s = _blocking(request)
        if index:
            await self.state.wait_for_change(lambda: self.state.service_view_index(name), index, wait_s)
        return _json(self.state.health_service(name, passing, tags), self.state.service_view_index(name))

    async def catalog_services(self, request: web.Request) -> web.Response:
        index, wait_s = _blocking(request)
        if index:
            await self.state.wait_for_change(lambda: self.state.catalog_index, index, wait_s)
        return _json(self.state.catalog_services(), self.state.catalog_index)

    async def status_leader(self, request: web.Request) -> web.Response:
        return _json(self.leader)

    async def status_peers(self, request: web.Request) -> web.Response:
        return _json([self.leader])

    # -- KV ------------------------------------------------------------------------------------------------

    async def kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        recurse = _bool_param(request, "recurse")
        keys_only = "keys" in request.query
        raw = _bool_param(request, "raw")
        if not key and not (recurse or keys_only):
            raise BadRequest("Missing key name")
        prefix_view = recurse or keys_only
        index, wait_s = _blocking(request)
        if index:
            await self.state.wait_for_change(lambda: self.state.kv_view_index(key, prefix_view), index, wait_s)
        view_index = self.state.kv_view_index(key, prefix_view)
        headers = {"X-Consul-Index": str(max(1, view_index)), "X-Consul-KnownLeader": "true"}
        if keys_only:
            separator = request.query.get("separator", "")
            found: list[str] = []
            for entry in self.state.kv_list(key):
                listed = entry.key
                if separator:
                    cut = entry.key.find(separator, len(key))
                    if cut >= 0:
                        listed = entry.key[: cut + len(separator)]
                if listed not in found:
                    found.append(listed)
            if not found:
                return web.Response(status=404, headers=headers)
            return _json(found, view_index)
        entries = self.state.kv_list(key) if recurse else [e for e in [self.state.kv.get(key)] if e is not None]
        if not entries:
            return web.Response(status=404, headers=headers)
        if raw and not recurse:
            return web.Response(body=entries[0].value, content_type="application/octet-stream", headers=headers)
        return _json([entry.view() for entry in entries], view_index)

    async def kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not key:
            raise BadRequest("Missing key name")
        if "acquire" in request.query or "release" in request.query:
            raise BadRequest("Sessions (acquire/release) are not supported by the embedded agent")
        flags = _uint_param(request, "flags") or 0
        cas = _uint_param(request, "cas")
        value = await request.read()
        if len(value) > MAX_KV_VALUE_BYTES:
            return _text(413, f"Value exceeds {MAX_KV_VALUE_BYTES} byte limit")
        return _json(self.state.kv_put(key, value, flags, cas))

    async def kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        recurse = _bool_param(request, "recurse")
        if not key and not recurse:
            raise BadRequest("Missing key name")
        return _json(self.state.kv_delete(key, recurse, _uint_param(request, "cas")))


def build_app(api: AgentAPI) -> web.Application:
    app = web.Application(middlewares=[consul_errors], client_max_size=MAX_KV_VALUE_BYTES + 64 * 1024)
    app.add_routes(api.routes())
    return app
