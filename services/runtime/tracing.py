"""OpenTelemetry set-up with W3C trace context carried in NATS message headers.

Tracing is off unless an OTLP endpoint (or a trace file, for debugging and tests) is configured;
when off, `span()` and `server_span()` hand out one shared no-op context manager and no headers are
injected, so an untraced request pays a function call per span.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_getter = DefaultGetter()
_provider: TracerProvider | None = None
# Tracing off: one shared, reusable context manager yielding the no-op span. The OpenTelemetry API's
# own no-op path (get_tracer + start_as_current_span + context attach/detach) costs ≈ 5 µs a span,
# several per request, which showed in the one-process EPP latency.
_OFF: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span; lets tests follow a trace across processes."""

    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self._path, "a", encoding="utf-8") as fh:
            for span in spans:
                ctx = span.get_span_context()
                parent = span.parent
                fh.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "service": span.resource.attributes.get("service.name"),
                            "trace_id": f"{ctx.trace_id:032x}",
                            "span_id": f"{ctx.span_id:016x}",
                            "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                            "start_ns": span.start_time,
                            "end_ns": span.end_time,
                            "attributes": {k: v for k, v in (span.attributes or {}).items()},
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


def setup_tracing(service: str, otlp_endpoint: str = "", trace_file: str = "") -> None:
    global _provider
    if not otlp_endpoint and not trace_file:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    trace.set_tracer_provider(provider)
    _provider = provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str = "kvr") -> trace.Tracer:
    return trace.get_tracer(name)


def span(name: str) -> AbstractContextManager[trace.Span]:
    """An INTERNAL/CLIENT span as the current span; the shared no-op when tracing is off."""
    if _provider is None:
        return _OFF
    return tracer().start_as_current_span(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) of the current span to outgoing NATS headers."""
    headers = dict(headers or {})
    if _provider is not None:
        _propagator.inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None) -> otel_context.Context | None:
    if not headers or "traceparent" not in headers:
        return None
    return _propagator.extract(headers, getter=_getter)


def server_span(name: str, headers: dict[str, str] | None, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A SERVER span that continues the trace found in the request headers, if any."""
    if _provider is None:
        return _OFF
    return tracer().start_as_current_span(
        name, context=extract_context(headers), kind=trace.SpanKind.SERVER, attributes=attributes or None
    )
