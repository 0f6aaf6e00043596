"""A lean OpenTelemetry tracer for the request path: the API's `TracerProvider`/`Tracer`/`Span`, recorded cheaply.

Why not the SDK's `TracerProvider`: with 100% sampling a request makes about
five spans across gateway and worker, and creating and ending one SDK span
costs ~18 us of CPU (per-attribute validation in `BoundedAttributes`, a lock
per span, a copy into a `ReadableSpan` at the end): ~100 us per request, about
9% of the whole mesh's CPU on a 2-core box where load generator, gateway and
worker share the cores, nearly the whole 10% budget for tracing. `LeanSpan`
keeps the attributes in a plain dict and hands itself to the span processor
when it ends; start plus end costs ~4 us. Measured: tracing cost 21% of the
mesh's throughput with SDK spans, 5-14% across runs with these
(bench/RESULTS.md).

What stays standard: components only use the OpenTelemetry API; the resource
comes from the SDK (`Resource.create`: `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`); the sampler follows `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG` with the SDK's semantics (`sampler_from_environ`);
ids come from `random.getrandbits` like the SDK's `RandomIdGenerator`; spans
reach any SDK `SpanProcessor` (`meshserve.otlp.OtlpSpanProcessor` in
production) through `on_end` with the fields a `ReadableSpan` has. Limits:
attribute values are not validated when set (the OTLP encoder drops a value
it cannot encode), and at most `MAX_ATTRIBUTES` attributes, events and links
are kept per span, the SDK's default limits; `start_as_current_span` returns a
plain context manager (no decorator form) and records exceptions as the SDK
does, while a span from `start_span` used in a `with` block only ends (nothing
here uses either form).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import Attributes

logger = logging.getLogger(__name__)

MAX_ATTRIBUTES = 128  # the SDK's default OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT (and event/link count limits)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_EMPTY_STATE = TraceState()
_RATIO_MASK = (1 << 64) - 1  # the SDK's TraceIdRatioBased looks at the low 64 bits of the trace id


class Sampling:
    """One of the SDK's built-in samplers (`OTEL_TRACES_SAMPLER`), as a plain decision function.

    `root` decides for a span without a valid parent: always, never, or by
    trace-id ratio. `parent_based` makes a span with a valid parent follow the
    parent's sampled flag, the SDK's `ParentBased` defaults.
    """

    def __init__(self, root: str = "always_on", ratio: float = 1.0, parent_based: bool = True) -> None:
        self.root = root
        self.ratio = ratio
        self.parent_based = parent_based
        self._bound = round(ratio * (_RATIO_MASK + 1))

    def sampled(self, parent: SpanContext | None, trace_id: int) -> bool:
        if self.parent_based and parent is not None:
            return parent.trace_flags.sampled
        if self.root == "always_on":
            return True
        if self.root == "always_off":
            return False
        return trace_id & _RATIO_MASK < self._bound

    def describe(self) -> str:
        root = f"traceidratio({self.ratio:g})" if self.root == "traceidratio" else self.root
        return f"parentbased({root})" if self.parent_based else root


def sampler_from_environ(env: Mapping[str, str]) -> Sampling:
    """The sampler `OTEL_TRACES_SAMPLER` (+ `_ARG`) names; the SDK's default, parent-based always-on, otherwise."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    parent_based = name.startswith("parentbased_")
    root = name.removeprefix("parentbased_")
    if root not in ("always_on", "always_off", "traceidratio"):
        logger.warning("unknown OTEL_TRACES_SAMPLER %r; using parentbased_always_on", name)
        return Sampling()
    ratio = 1.0
    if root == "traceidratio":
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            logger.warning("OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1]; using 1.0")
            ratio = 1.0
    return Sampling(root, ratio, parent_based)


class LeanSpan(trace.Span):
    """A recording span; read by span processors through the same fields as the SDK's `ReadableSpan`."""

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Attributes,
        links: Sequence[Link] | None,
        start_time: int,
        scope: InstrumentationScope,
        resource: Resource,
        processor: SpanProcessor,
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self._attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self._links: list[Link] = list(links) if links else []
        self._events: list[Event] = []
        self.start_time = start_time
        self.end_time: int | None = None
        self.status = _UNSET
        self.instrumentation_scope = scope
        self.resource = resource
        self.dropped_attributes = self.dropped_events = self.dropped_links = 0
        self._processor = processor

    # -- what span processors read -------------------------------------------

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._attributes

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    @property
    def links(self) -> tuple[Link, ...]:
        return tuple(self._links)

    # -- the API ---------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self.end_time is not None:
            return
        attributes = self._attributes
        if key in attributes or len(attributes) < MAX_ATTRIBUTES:
            attributes[key] = value
        else:
            self.dropped_attributes += 1

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self.end_time is not None:
            return
        if len(self._events) >= MAX_ATTRIBUTES:
            self.dropped_events += 1
            return
        self._events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self.end_time is not None or not context.is_valid:
            return
        if len(self._links) >= MAX_ATTRIBUTES:
            self.dropped_links += 1
            return
        self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides.
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event_attributes: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event_attributes.update(attributes)
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time if end_time is not None else time.time_ns()
        self._processor.on_end(self)  # type: ignore[arg-type]  # a ReadableSpan by its fields

    def __repr__(self) -> str:
        return f"LeanSpan({self.name!r}, trace_id={self.context.trace_id:032x}, span_id={self.context.span_id:016x})"


class LeanTracer(trace.Tracer):
    def __init__(self, provider: LeanTracerProvider, scope: InstrumentationScope) -> None:
        self._provider = provider
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        provider = self._provider
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id, trace_state = parent.trace_id, parent.trace_state
            sampled = provider.sampling.sampled(parent, trace_id)
        else:
            parent = None
            trace_id, trace_state = random.getrandbits(128) or 1, _EMPTY_STATE
            sampled = provider.sampling.sampled(None, trace_id)
        span_id = random.getrandbits(64) or 1
        if not sampled:
            # Still a real id pair, so the trace continues downstream marked not-sampled.
            return trace.NonRecordingSpan(SpanContext(trace_id, span_id, False, _NOT_SAMPLED, trace_state))
        span_context = SpanContext(trace_id, span_id, False, _SAMPLED, trace_state)
        return LeanSpan(
            name,
            span_context,
            parent,
            kind,
            attributes,
            links,
            start_time if start_time is not None else time.time_ns(),
            self._scope,
            provider.resource,
            provider.processor,
        )

    def start_as_current_span(  # type: ignore[override]  # a context manager object, not a generator
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        return _CurrentSpan(span, end_on_exit, record_exception, set_status_on_exception)


class _CurrentSpan:
    """`trace.use_span` as a plain object: the request path enters one or two per request, and two
    nested generator context managers (the API's shape) cost several times this."""

    __slots__ = ("_end_on_exit", "_record_exception", "_set_status", "_span", "_token")

    def __init__(self, span: trace.Span, end_on_exit: bool, record_exception: bool, set_status: bool) -> None:
        self._span = span
        self._end_on_exit = end_on_exit
        self._record_exception = record_exception
        self._set_status = set_status
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        span = self._span
        # Like use_span: Exception subclasses only (not GeneratorExit, KeyboardInterrupt, ...).
        if isinstance(error, Exception) and span.is_recording():
            if self._record_exception:
                span.record_exception(error)
            if self._set_status:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        if self._end_on_exit:
            span.end()


class LeanTracerProvider(trace.TracerProvider):
    """Tracers whose spans go to one span processor; `shutdown` flushes it."""

    def __init__(self, resource: Resource, sampling: Sampling, processor: SpanProcessor) -> None:
        self.resource = resource
        self.sampling = sampling
        self.processor = processor
        self._tracers: dict[tuple[str, str | None, str | None], LeanTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        key = (instrumenting_module_name, instrumenting_library_version, schema_url)
        tracer = self._tracers.get(key)
        if tracer is None:
            scope = InstrumentationScope(instrumenting_module_name, instrumenting_library_version, schema_url)
            tracer = self._tracers[key] = LeanTracer(self, scope)
        return tracer

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.processor.shutdown()
