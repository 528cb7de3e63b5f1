"""OpenTelemetry conventions, checked against real OTLP receivers (HTTP protobuf and gRPC)."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import nats
import pytest
from opentelemetry import trace

from schemas import codec
from schemas.subjects import Names
from services.runtime import tracing
from services.runtime.procs import ServiceProcess
from tests.runtime.otlp_receiver import GrpcReceiver, HttpReceiver, Span

OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield monkeypatch
    tracing.shutdown_tracing()


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


def emit(service: str = "kvr-test", otlp_endpoint: str = "") -> bool:
    on = tracing.setup_tracing(service, otlp_endpoint)
    with tracing.span("work", step=1):
        pass
    tracing.shutdown_tracing()  # flushes the batch processor
    return on


@pytest.mark.unit
def test_kvr_endpoint_base_url_gets_the_traces_path_over_http_only():
    assert tracing.kvr_endpoint("http://otel:4318", tracing.HTTP_PROTOBUF) == "http://otel:4318/v1/traces"
    assert tracing.kvr_endpoint("http://otel:4318/", tracing.HTTP_PROTOBUF) == "http://otel:4318/v1/traces"
    assert tracing.kvr_endpoint("http://otel:4318/v1/traces", tracing.HTTP_PROTOBUF) == "http://otel:4318/v1/traces"
    assert tracing.kvr_endpoint("https://gw/otlp/traces", tracing.HTTP_PROTOBUF) == "https://gw/otlp/traces"
    assert tracing.kvr_endpoint("http://otel:4317", tracing.GRPC) == "http://otel:4317"


@pytest.mark.unit
def test_unsupported_protocol_is_a_clear_error(clean_env):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        tracing.setup_tracing("kvr-test")


@pytest.mark.integration
def test_kvr_otlp_endpoint_base_url_posts_to_v1_traces(clean_env, http_receiver):
    assert emit(otlp_endpoint=http_receiver.url)
    assert http_receiver.paths == ["/v1/traces"]
    (span,) = http_receiver.spans
    assert (span.name, span.kind, span.service, span.attributes) == ("work", "INTERNAL", "kvr-test", {"step": 1})


@pytest.mark.integration
def test_otel_endpoint_service_name_and_resource_attributes(clean_env, http_receiver):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.url + "/")
    clean_env.setenv("OTEL_SERVICE_NAME", "router-a")
    clean_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,k8s.namespace.name=llm")
    assert emit()
    assert http_receiver.paths == ["/v1/traces"]
    (span,) = http_receiver.spans
    assert span.service == "router-a"
    assert span.resource["deployment.environment"] == "staging" and span.resource["k8s.namespace.name"] == "llm"


@pytest.mark.integration
def test_service_name_from_resource_attributes_wins_over_the_default(clean_env, http_receiver):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.url)
    clean_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert emit()
    assert [s.service for s in http_receiver.spans] == ["from-attributes"]


@pytest.mark.integration
def test_traces_endpoint_is_used_as_is_and_wins_over_the_base(clean_env, http_receiver):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", http_receiver.url + "/collector/traces")
    assert emit()
    assert http_receiver.paths == ["/collector/traces"] and len(http_receiver.spans) == 1


@pytest.mark.integration
def test_sdk_disabled_exporter_none_and_sampler_off_send_nothing(clean_env, http_receiver):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_receiver.url)
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not emit() and not tracing.tracing_enabled()
    clean_env.delenv("OTEL_SDK_DISABLED")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not emit()
    clean_env.delenv("OTEL_TRACES_EXPORTER")
    clean_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert emit()  # on, but the SDK's sampler (read from the environment) records nothing
    assert http_receiver.spans == []
    clean_env.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    clean_env.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    assert emit()
    assert len(http_receiver.spans) == 1


@pytest.mark.integration
def test_no_endpoint_means_tracing_off(clean_env):
    assert not tracing.setup_tracing("kvr-test")
    assert tracing.span("x") is tracing.server_span("y", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert tracing.inject_headers({"a": "b"}) == {"a": "b"}


@pytest.mark.integration
def test_gateway_traceparent_from_http_headers_is_continued(clean_env, http_receiver):
    """What the ext_proc handler does with the headers Envoy forwards (any case, bytes values)."""
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = [(":path", b"/v1/chat/completions"), ("TraceParent", f"00-{trace_id}-{parent_id}-01".encode()),
               ("tracestate", b"vendor=x")]
    tracing.setup_tracing("kvr-test", http_receiver.url)
    ctx = tracing.context_from_headers(headers)
    assert tracing.context_from_headers({"content-type": "application/json"}) is None
    assert tracing.context_from_headers(None) is None
    with tracing.server_span("ext_proc.process", None, context=ctx) as server:
        with tracing.client_span("scheduler.select"):
            pass
        assert server.get_span_context().trace_state.get("vendor") == "x"
    tracing.shutdown_tracing()
    by_name = {s.name: s for s in http_receiver.spans}
    server_span, client = by_name["ext_proc.process"], by_name["scheduler.select"]
    assert (server_span.kind, server_span.trace_id, server_span.parent_span_id) == ("SERVER", trace_id, parent_id)
    assert (client.kind, client.trace_id, client.parent_span_id) == ("CLIENT", trace_id, server_span.span_id)
    assert trace.get_current_span() is trace.INVALID_SPAN


def _children(spans: list[Span], parent: Span, name: str, kind: str) -> list[Span]:
    return [s for s in spans if s.parent_span_id == parent.span_id and s.name == name and s.kind == kind]


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_one_trace_from_the_gateway_through_bridge_scheduler_and_bookings(protocol, nats_server, tmp_path):
    """Real processes: mock workers, scheduler, EPP bridge exporting over OTLP to a real receiver."""
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,service.namespace=kvr-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    procs = [
        ServiceProcess("mock-workers", ["--count", "2", "--speedup", "50"], nats_url=nats_server.url, pools=["t"],
                       log_path=str(tmp_path / "mock.log")),
        ServiceProcess("scheduler", ["--seed", "1"], nats_url=nats_server.url, pools=["t"], env=otel,
                       log_path=str(tmp_path / "scheduler.log")),
        ServiceProcess("epp-bridge", [], nats_url=nats_server.url, pools=["t"],
                       env={**otel, "OTEL_SERVICE_NAME": "gateway-picker"}, log_path=str(tmp_path / "bridge.log")),
    ]
    trace_id, gateway_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(60)

        async def ask() -> dict:
            nc = await nats.connect(nats_server.url)
            try:
                for _ in range(100):  # until the scheduler has seen the workers
                    payload = {"request_id": f"r-{uuid.uuid4().hex[:8]}", "body": {"prompt": "", "nvext": {"token_data": list(range(300))}}}
                    msg = await nc.request(Names().epp_query("t"), codec.encode_json(payload), timeout=10,
                                           headers={"traceparent": f"00-{trace_id}-{gateway_span}-01"})
                    reply = msgspec.json.decode(msg.data)
                    if reply.get("status") == "ok":
                        return reply
                    await asyncio.sleep(0.1)
                raise AssertionError(reply)
            finally:
                await nc.close()

        asyncio.run(ask())
    finally:
        for p in reversed(procs):
            p.terminate()  # SIGTERM flushes the batch processors
        receiver.close()
    spans = [s for s in receiver.spans if s.trace_id == trace_id]
    servers = [s for s in spans if s.name == "epp.query" and s.kind == "SERVER" and s.parent_span_id == gateway_span]
    bridge = next(s for s in servers if _children(spans, s, Names().select("t"), "CLIENT"))
    assert bridge.service == "gateway-picker"
    (client,) = _children(spans, bridge, Names().select("t"), "CLIENT")
    assert client.service == "gateway-picker"
    (select,) = _children(spans, client, "scheduler.select", "SERVER")
    assert select.service == "kvr-scheduler"
    publishes = _children(spans, select, "bookings publish", "PRODUCER")
    assert publishes and all(p.attributes["kvr.booking"] == "add" for p in publishes)
    consumed = [c for p in publishes for c in _children(spans, p, "bookings process", "CONSUMER")]
    assert consumed and all(c.service == "kvr-scheduler" for c in consumed)
    for s in (bridge, client, select, *publishes, *consumed):
        assert s.resource["deployment.environment"] == "ci" and s.resource["service.namespace"] == "kvr-test"
    assert receiver.paths[0] == ("grpc:Export" if protocol == "grpc" else "/v1/traces")
