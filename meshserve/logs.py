"""Process-wide logging: one JSON object per line, human-readable on a terminal.

Every record carries the component, and the current trace and span ids when a
span is active, so a log line can be found from a trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else passed through `extra=` is
# copied into the JSON object (e.g. `model`).
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _trace_ids() -> tuple[str | None, str | None]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _trace_ids()
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if trace_id:
            entry["trace_id"], entry["span_id"] = trace_id, span_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """One readable line; the model and the trace id (to paste into Jaeger) follow the message when present."""

    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {component} %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        model = getattr(record, "model", None)
        trace_id, _ = _trace_ids()
        suffix = "".join(f" {key}={value}" for key, value in (("model", model), ("trace_id", trace_id)) if value)
        return line + suffix if "\n" not in line else line.replace("\n", suffix + "\n", 1)


LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(component: str, level: str = "info", *, json_lines: bool | None = None) -> None:
    """Sets up the root logger for one process. JSON unless stderr is a terminal.

    An unknown level falls back to info with a warning: a typo in a variable
    must not keep a service from starting.
    """
    given = level
    unknown = level.lower() not in LEVELS
    if unknown:
        level = "info"
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if json_lines else ConsoleFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and urllib3 are chatty at INFO/DEBUG; their warnings still show.
    for noisy in ("grpc", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
    if unknown:
        choices = ", ".join(LEVELS)
        logging.getLogger(__name__).warning("unknown log level %r, using info; choose one of %s", given, choices)
