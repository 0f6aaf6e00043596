"""meshserve.logs: JSON lines with component, level, message, model and trace
ids; readable lines on a terminal; the level flag."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from meshserve import logs

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A buffer for `configure_into`; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def configure_into(stream: io.StringIO, component: str, level: str, json_lines: bool | None = None) -> None:
    """logs.configure, with its handler writing to `stream` (pytest swaps sys.stderr between phases)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stderr", stream)
        logs.configure(component, level, json_lines=json_lines)


def active_span() -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))


def test_json_line_has_component_level_message_model_and_trace_ids(captured: io.StringIO) -> None:
    configure_into(captured, "worker", "info", json_lines=True)

    with trace.use_span(active_span()):
        logging.getLogger("worker.batcher").info("batch of %d", 8, extra={"model": "mlp784"})

    entry = json.loads(captured.getvalue().strip())
    assert entry["component"] == "worker"
    assert entry["level"] == "info"
    assert entry["message"] == "batch of 8"
    assert entry["model"] == "mlp784"
    assert entry["logger"] == "worker.batcher"
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert entry["span_id"] == "00f067aa0ba902b7"


def test_json_line_without_a_span_has_no_trace_ids_and_one_object_per_line(captured: io.StringIO) -> None:
    configure_into(captured, "gateway", "info", json_lines=True)

    logging.getLogger("gateway").warning("first\nsecond line")
    logging.getLogger("gateway").info("third")

    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["message"] == "first\nsecond line"
    assert "trace_id" not in first and "span_id" not in first


def test_exceptions_stay_inside_the_json_object(captured: io.StringIO) -> None:
    configure_into(captured, "gateway", "info", json_lines=True)

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("gateway").exception("failed")

    (line,) = captured.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert "RuntimeError: boom" in entry["exception"]


def test_level_filters_records(captured: io.StringIO) -> None:
    configure_into(captured, "registry", "warning", json_lines=True)

    logging.getLogger("registry").info("hidden")
    logging.getLogger("registry").warning("shown")

    messages = [json.loads(line)["message"] for line in captured.getvalue().splitlines()]
    assert messages == ["shown"]


def test_unknown_level_falls_back_to_info_and_says_so(captured: io.StringIO) -> None:
    configure_into(captured, "worker", "loud", json_lines=True)

    logging.getLogger("worker").debug("hidden")
    logging.getLogger("worker").info("shown")

    entries = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert entries[0]["level"] == "warning"
    assert entries[0]["message"].startswith("unknown log level 'loud', using info; choose one of debug, info,")
    assert [entry["message"] for entry in entries[1:]] == ["shown"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_readable_lines(captured: io.StringIO) -> None:
    terminal = _Terminal()
    configure_into(terminal, "worker", "info")

    with trace.use_span(active_span()):
        logging.getLogger("worker").info("loaded", extra={"model": "mlp784"})

    line = terminal.getvalue().strip()
    assert not line.startswith("{")
    assert "INFO" in line and "worker" in line and "loaded" in line
    assert line.endswith("model=mlp784 trace_id=4bf92f3577b34da6a3ce929d0e0e4736")


def test_piped_output_defaults_to_json(captured: io.StringIO) -> None:
    configure_into(captured, "worker", "info")

    logging.getLogger("worker").info("ready")

    assert json.loads(captured.getvalue())["message"] == "ready"
