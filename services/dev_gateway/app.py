"""A development gateway: OpenAI HTTP in, routed by an ext_proc endpoint picker, forwarded to a worker.

NOT a production gateway. It exists so `make run` can be reached with `curl` through the same
protocol a real GAIE gateway (Envoy Gateway, kgateway, Istio, GKE) speaks to the EPP bridge, without
installing Envoy. It has no TLS, no retries beyond the fallback list, no load shedding, no
connection limits, no header sanitising and no route configuration: put a real gateway in front of
the bridge in production (docs/deploy.md).

Per HTTP request, in Envoy's ext_proc filter order (FULL_DUPLEX_STREAMED both ways, as GAIE
configures), through the project's ext_proc client (`services/epp_bridge/extproc_client.py`):
1. request headers and body to the endpoint picker; an ImmediateResponse is answered to the client
   as is (its status and JSON body);
2. otherwise the header mutations (`x-gateway-destination-endpoint` = primary,fallback,…,
   `x-worker-instance-id`, …) go on the forwarded request, with the body as the picker passed it on;
   the endpoints are tried in order, the next one only when connecting fails;
3. the upstream response headers go to the picker, with `x-gateway-destination-endpoint-served`
   metadata when a fallback served, then every body chunk (the picker marks prefill done at the first
   one) and the end of stream (the booking is freed); the client gets the bytes the picker passed on.
A client that goes away resets the ext_proc stream, as Envoy does, and the picker frees the booking.
The response carries the endpoint that served (`x-gateway-destination-endpoint`) and the worker
(`x-worker-instance-id`, the worker's own header, else the picker's).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from services.epp_bridge import extproc_protocol as xp
from services.epp_bridge.extproc import EXTPROC_SERVICE
from services.epp_bridge.extproc_client import Decision, ExtProcClient, ExtProcStream
from services.runtime.http import bound_port
from services.runtime.logs import get_logger
from services.runtime.service import Runtime
from services.runtime.tasks import cancel_and_wait

from .settings import DevGatewayConfig

log = get_logger("kvr.dev_gateway")

REQUESTS = Counter("kvr_dev_gateway_requests_total", "HTTP requests through the dev gateway, by outcome", ["outcome"])

WORKER_HEADER = "x-worker-instance-id"
# Not forwarded either way (RFC 9110 connection-specific fields, plus what the HTTP client recomputes).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "host", "content-length", "expect",
})
HEALTH_POLL_S = 1.0


def error_body(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": code, "code": status}}).encode()


class DevGatewayApp:
    """`ServiceApp` of `kvr dev-gateway`: ready while the endpoint picker's ext_proc service is SERVING."""

    def __init__(self, cfg: DevGatewayConfig) -> None:
        self.cfg = cfg
        self.client: ExtProcClient | None = None
        self.http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._picker_ready = False
        self.port: int | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, rt: Runtime | None = None) -> None:
        self.client = ExtProcClient(self.cfg.extproc_target)
        self.http = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.upstream_connect_timeout_s, sock_read=self.cfg.upstream_timeout_s),
        )
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.gateway_host, self.cfg.gateway_port)
        await site.start()
        self.port = bound_port(site, self.cfg.gateway_port)
        self._tasks.append(asyncio.create_task(self._follow_picker(), name="dev-gateway-health"))
        log.info("dev_gateway.listening", url=f"http://{self.cfg.gateway_host}:{self.port}", extproc=self.cfg.extproc_target)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.client is not None:
            await self.client.close()

    def ready(self) -> bool:
        return self._picker_ready

    def status(self) -> dict[str, Any]:
        return {"gateway_port": self.port, "extproc_target": self.cfg.extproc_target, "picker_serving": self._picker_ready}

    async def _follow_picker(self) -> None:
        assert self.client is not None
        while True:
            try:
                serving = await self.client.health(EXTPROC_SERVICE, timeout=2.0) == "SERVING"
            except Exception:  # noqa: BLE001 - not reachable yet = not ready
                serving = False
            if serving != self._picker_ready:
                log.info("dev_gateway.picker", serving=serving)
                self._picker_ready = serving
            await asyncio.sleep(HEALTH_POLL_S)

    # --- one request ------------------------------------------------------------------------

    async def handle(self, req: web.Request) -> web.StreamResponse:
        assert self.client is not None
        body = await req.read() if req.body_exists else None
        headers = {k.lower(): v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.setdefault("x-request-id", uuid.uuid4().hex)
        pseudo = {":method": req.method, ":path": req.path_qs, ":authority": req.host, ":scheme": "http"}
        stream = self.client.stream(
            request_mode=xp.FULL_DUPLEX_STREAMED, response_mode=xp.FULL_DUPLEX_STREAMED, timeout=self.cfg.extproc_timeout_s
        )
        try:
            try:
                chunks = max(1, -(-len(body) // xp.BODY_CHUNK_LIMIT)) if body else 1
                decision = await stream.request(body, headers={**pseudo, **headers}, chunks=chunks)
            except Exception as exc:  # noqa: BLE001 - Envoy answers 500 when ext_proc fails (status_on_error)
                log.warning("dev_gateway.extproc_failed", error=f"{type(exc).__name__}: {exc}", x_request_id=headers["x-request-id"])
                REQUESTS.labels("extproc_error").inc()
                stream.cancel()
                return web.Response(status=500, body=error_body(500, f"endpoint picker failed: {type(exc).__name__}", "extproc_error"),
                                    content_type="application/json")
            if not decision.routed:
                REQUESTS.labels("rejected").inc()
                await self._finish(stream)
                return self._immediate(decision)
            return await self._forward(req, stream, decision, headers, pseudo)
        except BaseException:
            stream.cancel()  # client gone or upstream broken: Envoy resets the stream; the picker frees
            raise

    @staticmethod
    async def _finish(stream: ExtProcStream) -> None:
        try:
            await stream.finish()
        except Exception:  # noqa: BLE001 - the picker already ended the stream
            stream.cancel()

    @staticmethod
    def _immediate(decision: Decision) -> web.Response:
        hdrs = {k: v for k, v in decision.headers.items() if not k.startswith(":") and k.lower() not in HOP_BY_HOP}
        body = json.dumps(decision.error).encode() if decision.error is not None else b""
        hdrs.setdefault("content-type", "application/json")
        return web.Response(status=decision.status or 500, body=body, headers=hdrs)

    async def _forward(
        self, req: web.Request, stream: ExtProcStream, decision: Decision, headers: dict[str, str], pseudo: dict[str, str]
    ) -> web.StreamResponse:
        assert self.http is not None
        upstream_headers = {**headers, **{k: v for k, v in decision.headers.items() if not k.startswith(":")}}
        upstream_headers.pop("content-length", None)  # recomputed from the body as passed on
        endpoints = decision.endpoints
        body = decision.body if req.body_exists else None
        upstream: aiohttp.ClientResponse | None = None
        served = ""
        for endpoint in endpoints:
            try:
                upstream = await self.http.request(req.method, f"http://{endpoint}{pseudo[':path']}", data=body, headers=upstream_headers)
                served = endpoint
                break
            except aiohttp.ClientConnectorError as exc:
                log.info("dev_gateway.endpoint_unreachable", endpoint=endpoint, error=str(exc))
        if upstream is None:
            # Envoy's local reply when no endpoint accepts the connection; it passes the filter too.
            REQUESTS.labels("no_endpoint").inc()
            body503 = error_body(503, f"no endpoint accepted the connection: {', '.join(endpoints)}", "upstream_unreachable")
            await stream.response_headers(503, {"content-type": "application/json"})
            out = await stream.response_chunk(body503, end_of_stream=True)
            await self._finish(stream)
            return web.Response(status=503, body=out, content_type="application/json")
        async with upstream:
            fallback = served if served != endpoints[0] else None
            up_headers = {k.lower(): v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            mutations = await stream.response_headers(upstream.status, up_headers, served=fallback)
            out_headers = {**up_headers, **mutations, xp.DESTINATION_KEY: served}
            out_headers.setdefault(WORKER_HEADER, decision.headers.get(WORKER_HEADER, ""))
            resp = web.StreamResponse(status=upstream.status, headers=out_headers)
            await resp.prepare(req)
            async for chunk in upstream.content.iter_any():
                passed = await stream.response_chunk(chunk, end_of_stream=False)
                if passed:
                    await resp.write(passed)
            tail = await stream.response_chunk(b"", end_of_stream=True)
            if tail:
                await resp.write(tail)
            await resp.write_eof()
        await self._finish(stream)
        REQUESTS.labels("served_by_fallback" if fallback else "ok").inc()
        return resp
