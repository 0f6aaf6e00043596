"""Go durations and the validation of service registration bodies (the agent's input layer)."""

from __future__ import annotations

import pytest

from registry.agent.definitions import BadRequest, parse_service
from registry.agent.durations import DurationError, duration_seconds, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("500ms", 0.5), ("10s", 10.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("250us", 0.00025)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10x", "1m-", "ten seconds", "1s2"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_numbers_are_nanoseconds_as_go_encodes_them() -> None:
    assert duration_seconds(2_000_000_000) == 2.0
    with pytest.raises(DurationError):
        duration_seconds(True)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.5, "500ms"), (1, "1s"), (90, "1m30s"), (3600, "1h")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_service_body_fields_match_case_insensitively_and_snake_case() -> None:
    # py-consul sends lower-case keys; Consul's docs use PascalCase and snake_case aliases.
    definition = parse_service(
        {
            "name": "svc",
            "id": "svc-1",
            "port": 9000,
            "tags": ["a"],
            "meta": {"k": "v"},
            "checks": [{"grpc": "127.0.0.1:9000", "interval": "100ms", "deregister_critical_service_after": "5s"}],
            "SomethingNew": 1,  # unknown keys are ignored, as Consul's decoder ignores them
        },
        min_interval_s=1.0,
    )
    assert definition.id == "svc-1"
    (check,) = definition.checks
    assert check.check_id == "service:svc-1"
    assert check.kind == "grpc"
    assert check.interval_s == 1.0  # clamped to Consul's minimum interval
    assert check.timeout_s == 10.0  # Consul's default
    assert check.deregister_after_s == 5.0


def test_several_checks_get_numbered_ids() -> None:
    definition = parse_service({"Name": "s", "Checks": [{"TTL": "1s"}, {"TTL": "2s"}]}, 1.0)
    assert [c.check_id for c in definition.checks] == ["service:s:1", "service:s:2"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "JSON object"),
        ({}, "Missing service name"),
        ({"Name": 3}, "Name must be a string"),
        ({"Name": "s", "Port": "80"}, "Port"),
        ({"Name": "s", "Port": 70000}, "Port"),
        ({"Name": "s", "Tags": "a"}, "Tags"),
        ({"Name": "s", "Meta": {"k": 1}}, "Meta"),
        ({"Name": "s", "Meta": {f"k{i}": "v" for i in range(65)}}, "64"),
        ({"Name": "s", "Check": {"TTL": "soon"}}, "TTL"),
        ({"Name": "s", "Check": {"TTL": "0s"}}, "TTL must be > 0"),
        ({"Name": "s", "Check": {"GRPC": "nohost", "Interval": "1s"}}, "host:port"),
        ({"Name": "s", "Check": {"GRPC": "h:1"}}, "Interval"),
        ({"Name": "s", "Check": {"HTTP": "http://x"}}, "not supported"),
        ({"Name": "s", "Check": {}}, "TTL or GRPC"),
        ({"Name": "s", "Check": {"TTL": "1s", "Status": "great"}}, "status"),
        ({"Name": "s", "Checks": {"TTL": "1s"}}, "Checks must be a list"),
    ],
)
def test_bad_registrations_are_rejected_with_a_reason(body: object, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_service(body, 1.0)
