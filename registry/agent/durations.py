"""Go duration strings (`"500ms"`, `"1m30s"`), as Consul's API speaks them."""

from __future__ import annotations

import re

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    """A string that is not a Go duration."""


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string; raises DurationError with a reason a user can act on."""
    if not isinstance(text, str):
        raise DurationError(f"duration must be a string like '10s', got {text!r}")
    body = text.strip()
    sign = 1.0
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise DurationError(f"invalid duration {text!r}")
    total_ns = 0.0
    position = 0
    while position < len(body):
        match = _PART.match(body, position)
        if match is None:
            raise DurationError(f"invalid duration {text!r} (use a number and a unit: ns, us, ms, s, m, h)")
        total_ns += float(match.group(1)) * _UNITS_NS[match.group(2)]
        position = match.end()
    return sign * total_ns / 1e9


def duration_seconds(value: object) -> float:
    """A duration field from a JSON body: a Go duration string, or a number of nanoseconds (as Go encodes it)."""
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    return parse_duration(value)  # type: ignore[arg-type]


def format_duration(seconds: float) -> str:
    """The shortest Go-style string for `seconds` ("1s", "500ms", "1m30s")."""
    if seconds == 0:
        return "0s"
    total_ms = round(seconds * 1000)
    if total_ms % 1000:
        return f"{total_ms}ms"
    whole = total_ms // 1000
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)
