"""The EPP bridge as a gateway endpoint picker: Envoy external processing (ext_proc) over gRPC.

Gateways that implement the Gateway API Inference Extension (Envoy Gateway, kgateway, Istio, GKE)
call the endpoint picker of an InferencePool with Envoy's ext_proc protocol: one bidirectional
stream per HTTP request carrying request headers, body (and trailers), then the response's. This
server answers them from the bridge's one decision path (`EppBridgeApp.route`, the same as
`epp.query`), in the bridge process, on every replica (no leader election: all routing state is in
JetStream).

Per stream: wait for the whole request body (FULL_DUPLEX_STREAMED as GAIE configures, STREAMED or
BUFFERED), decide, answer with the routing headers + `envoy.lb` dynamic metadata and the body
unchanged; then follow the response to release the booking (`BookingLifecycle`). What is sent for
each phase and mode is documented in docs/epp_bridge.md ("ext_proc").
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from schemas import codec
from schemas.api import CleanupRequest, ErrorCode, SelectReply
from schemas.bookings import new_booking_id
from schemas.openai import OpenAiBody
from services.runtime.logs import get_logger
from services.runtime.responder import ServiceError, error_for, retry_after_of
from services.runtime.tracing import context_from_headers, server_span

from . import extproc_protocol as xp
from . import metrics
from .decision import DESTINATION, RouteAsk, destination, routing_headers
from .settings import EppBridgeConfig

if TYPE_CHECKING:
    from .app import EppBridgeApp

log = get_logger("kvr.epp_bridge.extproc")

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_POLL_S = 0.25


def server_credentials(cfg: EppBridgeConfig) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are configured; client certificates required (mTLS) when a
    client CA is too. A half-configured TLS setup is a startup error, never a silent plaintext port."""
    cert, key, client_ca = cfg.grpc_tls_cert, cfg.grpc_tls_key, cfg.grpc_tls_client_ca
    if not cert and not key:
        if client_ca:
            raise ValueError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        return None
    if not (cert and key):
        raise ValueError("ext_proc TLS needs both --grpc-tls-cert and --grpc-tls-key")
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())], root_certificates=root, require_client_auth=root is not None
    )


class ExtProcServer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, app: EppBridgeApp, cfg: EppBridgeConfig, pools: Sequence[str]) -> None:
        self.app = app
        self.cfg = cfg
        pool = cfg.grpc_pool or ""
        if not pool:
            if len(pools) != 1:
                raise ValueError(f"the bridge serves {len(pools)} pools {list(pools)}: say which one ext_proc routes for with --grpc-pool")
            pool = pools[0]
        elif pool not in pools:
            raise ValueError(f"--grpc-pool {pool!r} is not one of the bridge's pools {list(pools)}")
        self.pool = pool
        self.fallbacks = max(0, min(cfg.grpc_fallbacks, 16))
        self.max_body_bytes: int = cfg.epp_max_body_bytes
        self.max_decisions = max(1, cfg.grpc_max_decisions)
        self.deciding = 0
        self.credentials = server_credentials(cfg)
        self.tls_mode = "off" if self.credentials is None else ("mtls" if cfg.grpc_tls_client_ca else "tls")
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.streams = 0

    async def start(self) -> int:
        server = grpc.aio.server(
            maximum_concurrent_rpcs=int(self.cfg.grpc_max_streams),
            options=[
                ("grpc.so_reuseport", 0),  # a second process must not silently share the port
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.max_receive_message_length", max(4 << 20, self.max_body_bytes + (1 << 16))),
            ],
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.cfg.grpc_host}:{int(self.cfg.grpc_port)}"
        creds = self.credentials
        port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
        if not port:
            raise OSError(f"cannot bind the ext_proc server to {address}")
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        for name in ("", "readiness", EXTPROC_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        self.port = port
        self._health_task = asyncio.create_task(self._follow_readiness(), name="extproc-health")
        return port

    async def _follow_readiness(self) -> None:
        """readiness, the ext_proc service and "" follow the bridge's own readiness (connected to
        NATS, discovery caught up, scheduler reachable in one-process mode)."""
        last: bool | None = None
        while True:
            ready = self.app.ready()
            if ready != last:
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", "readiness", EXTPROC_SERVICE):
                    await self.health.set(name, status)
                log.info("grpc.health", ready=ready)
                last = ready
            await asyncio.sleep(HEALTH_POLL_S)

    async def stop(self, grace: float | None = None) -> None:
        grace = float(self.cfg.grpc_drain_s) if grace is None else grace
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            # Streams still open after the grace period are cancelled; their bookings are freed.
            await self._server.stop(grace)
            self._server = None

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "pool": self.pool, "tls": self.tls_mode, "streams": self.streams, "deciding": self.deciding}

    # --- the RPC ----------------------------------------------------------------------------

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any) -> AsyncIterator[pb.ProcessingResponse]:  # gRPC name
        stream = _Stream(self)
        self.streams += 1
        metrics.EXTPROC_STREAMS.inc()
        try:
            async for req in request_iterator:
                out, done = await stream.handle(req)
                for resp in out:
                    yield resp
                if done:
                    return
        finally:
            self.streams -= 1
            metrics.EXTPROC_STREAMS.dec()
            stream.close()


class _Stream:
    """One HTTP request's ext_proc stream."""

    def __init__(self, server: ExtProcServer) -> None:
        self.server = server
        self.app = server.app
        self.pool = server.pool
        self.config: xp.StreamConfig | None = None
        self.request_id = f"xp-{uuid.uuid4().hex}"
        self.headers: dict[str, str] = {}
        self.subset: list[str] | None = None
        self.body = bytearray()
        self.chunks = 0
        self.headers_answered = False  # the request headers got their response before the body
        self.decided = False
        self.outcome: str | None = None
        self.reply: SelectReply | None = None
        self.lifecycle = xp.BookingLifecycle(booked=False)
        self._pending: list[CleanupRequest] = []
        self._sender: asyncio.Task[None] | None = None

    # --- dispatch ---------------------------------------------------------------------------

    async def handle(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        """The responses to send for one message, and whether the stream is over."""
        if self.config is None:
            self.config = xp.StreamConfig.of(req)
        if req.observability_mode:
            return [], False  # Envoy expects no answer and would ignore a routing decision
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(req)
        if kind == "request_body":
            return await self._request_body(req.request_body)
        if kind == "request_trailers":
            return await self._request_trailers()
        if kind == "response_headers":
            return self._response_headers(req), False
        if kind == "response_body":
            return self._response_body(req.response_body), False
        if kind == "response_trailers":
            self._update(self.lifecycle.finished())
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())], False
        return self._fail(ErrorCode.INVALID_REQUEST, "ext_proc message without a known request phase"), True

    # --- request path -----------------------------------------------------------------------

    async def _request_headers(self, req: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        assert self.config is not None
        self.headers = xp.header_map(req.request_headers.headers)
        self.subset = xp.subset_hint(req)
        if req.request_headers.end_of_stream:
            # No body (e.g. GET /v1/models): route now, on load alone.
            return await self._decide(None)
        if self.config.request_waits_for_headers:
            self.headers_answered = True
            # STREAMED with Envoy waiting for this answer: ask for the whole body at once, where the
            # routing headers can still take effect (honoured with the filter's allow_mode_override).
            override = xp.BUFFERED if self.config.request_body_mode == xp.STREAMED else None
            return [xp.request_headers_response(mode_override=override)], False
        return [], False  # FULL_DUPLEX_STREAMED / STREAMED without waiting: answered with the decision

    async def _request_body(self, part: pb.HttpBody) -> tuple[list[pb.ProcessingResponse], bool]:
        if self.decided:
            return [], False  # Envoy sends nothing after the end of the body; be lenient
        self.body += part.body
        self.chunks += 1
        if len(self.body) > self.server.max_body_bytes:
            return self._fail(ErrorCode.INVALID_REQUEST, f"request body is over the limit of {self.server.max_body_bytes} bytes"), True
        if not part.end_of_stream:
            if self.headers_answered:
                # STREAMED after a headers answer: every chunk is answered (unchanged) in order.
                return [xp.request_body_response()], False
            return [], False
        return await self._decide(bytes(self.body), body_end_of_stream=True)

    async def _request_trailers(self) -> tuple[list[pb.ProcessingResponse], bool]:
        trailers = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        if self.decided:
            return [trailers], False
        # The body ended with trailers instead of an end-of-stream chunk.
        out, done = await self._decide(bytes(self.body), body_end_of_stream=False)
        return (out if done else [*out, trailers]), done

    async def _decide(self, body: bytes | None, body_end_of_stream: bool = True) -> tuple[list[pb.ProcessingResponse], bool]:
        assert self.config is not None
        self.decided = True
        server = self.server
        if server.deciding >= server.max_decisions:
            # Shed at once: queueing more would only push every request past the select deadline.
            return self._fail(ErrorCode.OVERLOADED, f"{server.deciding} requests are being decided already (--grpc-max-decisions)"), True
        server.deciding += 1
        started = time.perf_counter()
        try:
            ask = self._ask(body)
            try:
                # Continues the gateway's trace (traceparent of the HTTP request) into scheduler.select.
                ctx = context_from_headers(self.headers)
                with server_span("ext_proc.decide", None, context=ctx, **{"kvr.pool": self.pool, "kvr.request_id": self.request_id}):
                    routed = await self.app.route(self.pool, ask)
            except asyncio.CancelledError:
                # The stream went away mid-decision: the scheduler may still book it.
                if ask.book:
                    self.app._compensate(self.pool, self.request_id, ask.booking_id)
                self.outcome = "aborted"
                raise
            reply = routed.reply
            if routed.query_only:
                # Dynamo's `query_instance_id`: the worker ids, answered by the gateway; nothing booked.
                self.outcome = "query_instance_id"
                return [xp.instance_id_response(reply)], True
            self.reply = reply
            self.lifecycle = xp.BookingLifecycle(booked=ask.book)
            endpoints = destination(reply)
            if not endpoints:
                raise ServiceError(ErrorCode.NO_WORKERS, f"worker {reply.decode.worker_id} has no address:port in discovery")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # every failure becomes an ImmediateResponse
            code, message, path = error_for(exc)
            if code is ErrorCode.INTERNAL:
                log.exception("extproc.decision_failed", request_id=self.request_id)
            return self._fail(code, message, path, retry_after_of(exc)), True
        finally:
            server.deciding -= 1
            metrics.EXTPROC_DECISION_SECONDS.observe(time.perf_counter() - started)

        self.outcome = "routed"
        dest = ",".join(endpoints)
        headers = routing_headers(reply, None)
        headers[DESTINATION] = dest
        mode = self.config.request_body_mode
        if body is None:
            return [xp.request_headers_response(xp.routing_common(headers), dest)], False
        if self.headers_answered:
            # BUFFERED (or STREAMED after a headers answer): the decision rides on the body answer;
            # header mutations on a body response take effect while Envoy still holds the headers.
            return [xp.request_body_response(xp.routing_common(headers), dest)], False
        if mode == xp.FULL_DUPLEX_STREAMED:
            # The headers answer first, then the body back as streamed mutations (GAIE's order), byte
            # for byte; content-length stays right since the body is unchanged.
            headers["content-length"] = str(len(body))
            return [xp.request_headers_response(xp.routing_common(headers), dest), *xp.streamed_request_body(body, body_end_of_stream)], False
        # STREAMED with the body sent without waiting: the headers answer, then one (unchanged)
        # answer per body chunk received.
        return [xp.request_headers_response(xp.routing_common(headers), dest), *[xp.request_body_response() for _ in range(self.chunks)]], False

    def _ask(self, body: bytes | None) -> RouteAsk:
        parsed: OpenAiBody | None = None
        if body is not None:
            if not body.strip():
                raise ServiceError(ErrorCode.INVALID_REQUEST, "the request body is empty", "$")
            parsed = codec.decode(body, OpenAiBody)
        raw_bytes = body
        return RouteAsk(
            self.request_id,
            parsed,
            (lambda: codec.decode(raw_bytes, dict)) if raw_bytes is not None else None,
            endpoints=self.subset,
            book=parsed is not None,
            fallbacks=self.server.fallbacks,
            booking_id=new_booking_id(),
            headers=self.headers,
        )

    def _fail(self, code: ErrorCode, message: str, path: str | None = None, retry_after_s: float | None = None) -> list[pb.ProcessingResponse]:
        self.outcome = code
        log.debug("extproc.rejected", request_id=self.request_id, x_request_id=self.headers.get("x-request-id"),
                  code=code, message=message, path=path)
        self._update(self.lifecycle.finished())
        return [xp.immediate_response(code, message, path, retry_after_s)]

    # --- response path = cleanup ------------------------------------------------------------

    def _response_headers(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        assert self.config is not None
        self._note_served(req)
        if req.response_headers.end_of_stream:
            self._update(self.lifecycle.response_started())
            self._update(self.lifecycle.finished())
        elif not self.config.response_body_streamed:
            self._update(self.lifecycle.response_started())
        return [pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse()))]

    def _response_body(self, part: pb.HttpBody) -> list[pb.ProcessingResponse]:
        assert self.config is not None
        self._update(self.lifecycle.response_started())
        if part.end_of_stream:
            self._update(self.lifecycle.finished())
        if self.config.response_body_mode == xp.FULL_DUPLEX_STREAMED:
            return [xp.echo_response_body(part.body, part.end_of_stream)]
        return [pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse()))]

    def _note_served(self, req: pb.ProcessingRequest) -> None:
        served = xp.served_endpoint(req)
        reply = self.reply
        if served is None or reply is None:
            return
        booked = (reply.decode.worker_id, reply.decode.dp_rank)
        if reply.decode.endpoint == served:
            return
        # Prefer the fallback the gateway was given for that endpoint; else any rank behind it.
        target = next(((t.worker_id, t.dp_rank) for t in reply.fallbacks if t.endpoint == served), None)
        if target is None:
            known = self.app.pod_index(self.pool).targets([served])
            target = known[0] if known else None
        if target is None:
            log.warning("extproc.served_unknown_endpoint", request_id=self.request_id, served=served)
            return
        self._update(self.lifecycle.served_by(target, booked), target)

    def close(self) -> None:
        """The stream is over, however it ended: release what is still booked."""
        self._update(self.lifecycle.finished())
        metrics.EXTPROC_REQUESTS.labels(self.outcome or "aborted").inc()

    def _update(self, phases: list[str], target: tuple[int, int] | None = None) -> None:
        """Send booking updates in order, off the stream's path (a slow scheduler never delays the
        response bytes)."""
        for phase in phases:
            req = CleanupRequest(
                request_id=self.request_id, phase=phase,  # type: ignore[arg-type]
                worker_id=target[0] if target and phase == "move" else None,
                dp_rank=target[1] if target and phase == "move" else None,
                booking_id=(self.reply.booking_id or None) if self.reply is not None else None,
            )
            self._pending.append(req)
        if self._pending and (self._sender is None or self._sender.done()):
            self._sender = self.app.booking_updates(self.pool, self._pending)
