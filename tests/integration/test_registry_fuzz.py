"""Bad input to the embedded agent (a fuzz of bodies, paths and query strings) never kills it and never
makes it fail with a server error: every answer is a Consul status code with a plain reason."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ManagedProcess, process_group

pytestmark = pytest.mark.integration

PATHS = [
    ("PUT", "/v1/agent/service/register"),
    ("PUT", "/v1/agent/service/deregister/{}"),
    ("PUT", "/v1/agent/service/maintenance/{}"),
    ("GET", "/v1/agent/services"),
    ("GET", "/v1/agent/service/{}"),
    ("GET", "/v1/agent/checks"),
    ("PUT", "/v1/agent/check/pass/{}"),
    ("PUT", "/v1/agent/check/warn/{}"),
    ("PUT", "/v1/agent/check/fail/{}"),
    ("GET", "/v1/health/service/{}"),
    ("GET", "/v1/catalog/services"),
    ("GET", "/v1/status/leader"),
    ("GET", "/v1/kv/{}"),
    ("PUT", "/v1/kv/{}"),
    ("DELETE", "/v1/kv/{}"),
    ("POST", "/v1/agent/service/register"),
    ("GET", "/v1/{}"),
]
PARAMS = ["index", "wait", "passing", "tag", "recurse", "raw", "keys", "separator", "cas", "flags", "enable"]
PARAMS += ["reason", "note", "replace-existing-checks", "acquire", "dc"]
SERVICE_KEYS = ["Name", "ID", "Tags", "Address", "Port", "Meta", "Check", "Checks", "Weights", "EnableTagOverride"]
CHECK_KEYS = ["CheckID", "Name", "TTL", "GRPC", "GRPCUseTLS", "Interval", "Timeout", "Status", "HTTP", "Notes"]
CHECK_KEYS += ["DeregisterCriticalServiceAfter", "deregister_critical_service_after", "ttl", "grpc"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["1s", "10ms", "0", "-1s", "1h", "127.0.0.1:1", "passing", "critical", "x:99999"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
checks = st.dictionaries(st.sampled_from(CHECK_KEYS), json_values, max_size=6)
services = st.dictionaries(
    st.sampled_from(SERVICE_KEYS),
    st.one_of(json_values, checks, st.lists(checks, max_size=3)),
    max_size=8,
)
bodies = st.one_of(
    services.map(lambda s: json.dumps(s).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(b'{"Name": "a", "Check": {"TTL": "1s"'),  # truncated JSON
)
segments = st.text(max_size=20).map(lambda t: urllib.parse.quote(t, safe="/:"))
queries = st.lists(st.tuples(st.one_of(st.sampled_from(PARAMS), st.text(max_size=6)), st.text(max_size=12)), max_size=5)


@pytest.fixture(scope="module")
def agent() -> Iterator[tuple[ManagedProcess, int]]:
    with process_group() as group:
        proc, url = group.registry()
        yield proc, int(url.rsplit(":", 1)[1])


def request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def query_string(pairs: list[tuple[str, str]]) -> str:
    # An index could make a valid blocking query that is held for minutes: keep such holds short.
    if any(key == "index" for key, _ in pairs):
        pairs = [(k, v) for k, v in pairs if k != "wait"] + [("wait", "20ms")]
    return urllib.parse.urlencode(pairs)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(PATHS), segment=segments, pairs=queries, body=bodies)
def test_fuzzed_requests_never_crash_the_agent(
    agent: tuple[ManagedProcess, int],
    endpoint: tuple[str, str],
    segment: str,
    pairs: list[tuple[str, str]],
    body: bytes,
) -> None:
    proc, port = agent
    method, template = endpoint
    path = template.replace("{}", segment)
    qs = query_string(pairs)
    status, reply = request(port, method, f"{path}?{qs}" if qs else path, body if method in ("PUT", "POST") else b"")
    assert status < 500, f"{method} {path}?{qs} -> {status}: {reply[:300]!r}"
    assert b"Traceback" not in reply
    assert proc.alive()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(service=services)
def test_fuzzed_registrations_are_accepted_or_rejected_with_400(
    agent: tuple[ManagedProcess, int], service: dict[str, object]
) -> None:
    proc, port = agent
    status, reply = request(port, "PUT", "/v1/agent/service/register", json.dumps(service).encode())
    assert status in (200, 400), reply
    if status == 400:
        assert reply.strip(), "a rejection must say why"
    assert proc.alive()
    # Whatever was accepted must still render in every read view.
    for path in ("/v1/agent/services", "/v1/agent/checks", "/v1/catalog/services"):
        assert request(port, "GET", path)[0] == 200


def test_agent_still_serves_after_the_fuzz(agent: tuple[ManagedProcess, int]) -> None:
    proc, port = agent
    status, reply = request(port, "GET", "/v1/status/leader")
    assert status == 200 and json.loads(reply).endswith(f":{port}")
    assert proc.alive()
