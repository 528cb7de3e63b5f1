"""`/healthz`, `/readyz`, Prometheus `/metrics` and (services with replicated state) `/digest` on one
small aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, generate_latest

READY = Gauge("kvr_ready", "1 while /readyz answers 200 (caught up with the streams and serving), else 0")


def bound_port(site: web.TCPSite, requested: int) -> int:
    """The port a started site listens on (the one the OS picked when `requested` is 0)."""
    server = site._server
    sockets = server.sockets if isinstance(server, asyncio.Server) else ()
    return int(sockets[0].getsockname()[1]) if sockets else requested


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        healthy: Callable[[], bool] = lambda: True,
        registry: CollectorRegistry = REGISTRY,
        status: Callable[[], dict] | None = None,
        digest: Callable[[], dict] | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._ready, self._healthy, self._registry = ready, healthy, registry
        self._status = status
        self._digest = digest
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _healthz(self, _req: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"status": "ok" if ok else "unhealthy"}, status=200 if ok else 503)

    async def _readyz(self, _req: web.Request) -> web.Response:
        ok = self._ready()
        body = {"status": "ready" if ok else "not_ready"}
        if self._status is not None:
            body.update(self._status())
        return web.json_response(body, status=200 if ok else 503)

    async def _digest_view(self, _req: web.Request) -> web.Response:
        # A fingerprint of the service's derived state (equal on replicas that applied the same
        # streams); computed on request, so it is for comparing replicas, not for probes.
        if self._digest is None:
            return web.json_response({"status": "error", "error": "this service keeps no replicated state"}, status=404)
        return web.json_response(self._digest())

    async def _metrics(self, _req: web.Request) -> web.Response:
        if self._registry is REGISTRY:
            READY.set(1 if self._ready() else 0)
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/digest", self._digest_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = bound_port(site, self._port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
