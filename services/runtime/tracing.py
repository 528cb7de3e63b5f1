"""OpenTelemetry set-up with W3C trace context carried in NATS message headers.

Configuration follows the OpenTelemetry conventions, read by the SDK itself wherever it can:

- `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL: traces go to `<base>/v1/traces` over HTTP) or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) switch OTLP export on;
  `OTEL_EXPORTER_OTLP_PROTOCOL` / `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` pick `http/protobuf`
  (default) or `grpc`; headers, timeouts, compression and TLS variables are the exporter's own.
- `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` set the resource (default service name
  `kvr-<command>`); `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` the sampler; `OTEL_BSP_*`
  the batch processor; `OTEL_SDK_DISABLED=true` turns everything off; `OTEL_TRACES_EXPORTER=none`
  turns the OTLP export off.
- `KVR_OTLP_ENDPOINT` (`--otlp-endpoint`) is kvr's alias and wins over the OTEL endpoint variables:
  over HTTP a URL without a path is a base URL (`/v1/traces` is appended), one with a path is used
  as is; over gRPC it is the collector's address.

Tracing is off unless an OTLP endpoint (or a trace file, for debugging and tests) is configured;
when off, every span helper hands out one shared no-op context manager and no headers are
injected, so an untraced request pays a function call per span.

Span kinds: a handled request is a SERVER span (`server_span`, continuing the caller's trace from
the request headers); a request this process sends is a CLIENT span (`client_span`); a JetStream
publish is a PRODUCER span (`producer_span`) whose context travels in the message headers, and
applying that message on a consumer is a CONSUMER span (`consumer_span`); local work is INTERNAL
(`span`). An HTTP/gRPC front end (the ext_proc server) turns the gateway's request headers into a
parent context with `context_from_headers` and opens its SERVER span with `server_span(...,
context=...)`, so a `traceparent` set by the gateway is continued through the router.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
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
_tracer: trace.Tracer | None = None
# Tracing off: one shared, reusable context manager yielding the no-op span. The OpenTelemetry API's
# own no-op path (get_tracer + start_as_current_span + context attach/detach) costs ≈ 5 µs a span,
# several per request, which showed in the one-process EPP latency.
_OFF: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)

HTTP_PROTOBUF, GRPC = "http/protobuf", "grpc"
TRACES_PATH = "/v1/traces"


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span; lets tests follow a trace across processes."""

    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self._path, "a", encoding="utf-8") as fh:
            for span in spans:
                ctx = span.get_span_context()
                parent = span.parent
                if ctx is None:  # not a recorded span
                    continue
                fh.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "kind": span.kind.name,
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


def _env_true(name: str, env: Mapping[str, str]) -> bool:
    return env.get(name, "").strip().lower() == "true"


def otlp_protocol(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or HTTP_PROTOBUF).strip()
    if protocol not in (HTTP_PROTOBUF, GRPC):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: kvr supports {HTTP_PROTOBUF!r} and {GRPC!r}")
    return protocol


def kvr_endpoint(value: str, protocol: str) -> str:
    """`KVR_OTLP_ENDPOINT` as the exporter's endpoint: over HTTP a bare base URL gets `/v1/traces`."""
    value = value.strip()
    if protocol == HTTP_PROTOBUF and urlsplit(value).path in ("", "/"):
        return value.rstrip("/") + TRACES_PATH
    return value


def otlp_exporter(otlp_endpoint: str = "", env: Mapping[str, str] | None = None) -> SpanExporter | None:
    """The OTLP span exporter the configuration asks for, or None when OTLP export is off.

    Without `otlp_endpoint` the exporter reads the OTEL endpoint variables itself (that is where the
    base-URL-plus-`/v1/traces` rule lives); with it, `otlp_endpoint` is passed explicitly."""
    env = os.environ if env is None else env
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    configured = otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not configured:
        return None
    protocol = otlp_protocol(env)
    endpoint = kvr_endpoint(otlp_endpoint, protocol) if otlp_endpoint else None
    if protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        if endpoint is None:
            return GrpcExporter()
        # A plain http:// address means no TLS, as the SDK decides for its own variables.
        return GrpcExporter(endpoint=endpoint, insecure=True if endpoint.startswith("http://") else None)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint) if endpoint else HttpExporter()


def resource_for(service: str) -> Resource:
    """`service` as service.name unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name one;
    every other attribute of OTEL_RESOURCE_ATTRIBUTES is kept (Resource.create reads both)."""
    from_env = OTELResourceDetector().detect()
    own = {} if "service.name" in from_env.attributes else {"service.name": service}
    return Resource.create(own)


def setup_tracing(service: str, otlp_endpoint: str = "", trace_file: str = "") -> bool:
    """Install the tracer provider when tracing is configured; True when it is on."""
    global _provider, _tracer
    if _env_true("OTEL_SDK_DISABLED", os.environ):
        return False
    exporter = otlp_exporter(otlp_endpoint)
    if exporter is None and not trace_file:
        return False
    # No sampler argument: the SDK takes OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default:
    # parent-based always-on), so a gateway's sampling decision in `traceparent` is honoured.
    provider = TracerProvider(resource=resource_for(service))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)  # for libraries; kvr's own spans use `_tracer`
    _provider, _tracer = provider, provider.get_tracer("kvr")
    return True


def shutdown_tracing() -> None:
    """Flush and stop; tracing is off afterwards (a later `setup_tracing` may start it again)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def tracing_enabled() -> bool:
    return _tracer is not None


def _start(
    name: str, kind: trace.SpanKind, parent: otel_context.Context | None, attributes: dict[str, Any]
) -> AbstractContextManager[trace.Span]:
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes or None)


def span(name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """An INTERNAL span (local work) as the current span; the shared no-op when tracing is off."""
    return _start(name, trace.SpanKind.INTERNAL, None, attributes)


def client_span(name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A CLIENT span around a request this process sends (inject its context with `inject_headers`)."""
    return _start(name, trace.SpanKind.CLIENT, None, attributes)


def producer_span(name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A PRODUCER span around a stream publish (inject its context into the message headers)."""
    return _start(name, trace.SpanKind.PRODUCER, None, attributes)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) of the current span to outgoing NATS headers."""
    headers = dict(headers or {})
    if _tracer is not None:
        _propagator.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    if not headers or "traceparent" not in headers:
        return None
    return _propagator.extract(headers, getter=_getter)


def context_from_headers(
    headers: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None,
) -> otel_context.Context | None:
    """The caller's trace context from HTTP or gRPC request headers (W3C `traceparent` and
    `tracestate`; any letter case; str or bytes values), or None when there is none.

    The ext_proc handler must call it with the request headers Envoy forwards (each header's key and
    `raw_value`/`value`) and open its SERVER span as `server_span(name, None, context=ctx)`, so that
    a `traceparent` from the gateway is continued through the bridge, the scheduler and the booking.
    """
    if _tracer is None or not headers:  # tracing off: nothing to continue, and no scan of the headers
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    carrier: dict[str, str] = {}
    for key, value in items:
        low = key.lower()
        if low in ("traceparent", "tracestate"):
            carrier[low] = value.decode("latin-1") if isinstance(value, bytes) else value
    return extract_context(carrier)


def server_span(
    name: str, headers: Mapping[str, str] | None, *, context: otel_context.Context | None = None, **attributes: Any
) -> AbstractContextManager[trace.Span]:
    """A SERVER span that continues the trace of the request: from NATS `headers`, or a `context`
    already extracted (e.g. by `context_from_headers`)."""
    if _tracer is None:
        return _OFF
    return _start(name, trace.SpanKind.SERVER, context if context is not None else extract_context(headers), attributes)


def consumer_span(name: str, headers: Mapping[str, str] | None, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A CONSUMER span for applying one stream message, child of its PRODUCER span when the message
    carries a `traceparent`; untraced messages get none (a replica applies every message)."""
    if _tracer is None:
        return _OFF
    parent = extract_context(headers)
    if parent is None:
        return _OFF
    return _start(name, trace.SpanKind.CONSUMER, parent, attributes)
