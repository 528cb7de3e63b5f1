"""The lifecycle every service shares: config → logging/tracing → NATS → provision → HTTP → run → drain.

A service implements `ServiceApp` (start/stop/ready); `run_app` does everything else, including a
clean exit 0 on SIGTERM/SIGINT after draining the NATS connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas.subjects import Names

from .config import ServiceConfig, Setting, add_settings, names_of, resolve
from .heap import freeze_startup_heap
from .http import HealthServer
from .logs import get_logger, redact_fields, setup_logging
from .natsauth import NatsAuth, redact_url
from .natsio import ConnectionState, ProvisioningError, StreamSettings, connect, provision
from .tasks import cancel_and_wait
from .tracing import setup_tracing, shutdown_tracing
from .workers import WorkerWatcher


class Runtime:
    """What a running service gets handed: config, names, connection, logger, and what the
    components of one process share (the discovery watcher)."""

    def __init__(self, name: str, cfg: ServiceConfig, nc: NATS) -> None:
        self.name = name
        self.cfg = cfg
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.names: Names = names_of(cfg)
        self.log = get_logger(f"kvr.{name}")
        self.stopping = asyncio.Event()
        self._discovery: WorkerWatcher | None = None

    @property
    def pools(self) -> list[str]:
        return list(self.cfg.pool)

    def discovery(self) -> WorkerWatcher:
        """The process's one follower of the discovery bucket (for its pools), shared by all its
        components: the one-process bridge, its scheduler and their index replica `listen` to the
        same watcher instead of following the bucket three times."""
        if self._discovery is None:
            lag = self.cfg.max_ready_lag_s
            self._discovery = WorkerWatcher(self.nc, self.names.workers_bucket, self.pools, expire=False, max_lag_s=lag)
        return self._discovery


class ServiceApp(Protocol):
    async def start(self, rt: Runtime) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


def stream_settings(cfg: ServiceConfig) -> StreamSettings:
    return StreamSettings(
        kv_max_age_s=cfg.kv_max_age_s, bookings_max_age_s=cfg.bookings_max_age_s, replicas=cfg.stream_replicas,
        kv_max_bytes=cfg.kv_max_bytes, bookings_max_bytes=cfg.bookings_max_bytes,
    )


def build_parser(prog: str, description: str, settings: Sequence[Setting]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_settings(parser, settings)
    return parser


async def run_app(name: str, cfg: ServiceConfig, app: ServiceApp) -> int:
    setup_logging(cfg.log_format, cfg.log_level, service=name)
    try:
        setup_tracing(f"kvr-{name}", cfg.otlp_endpoint, cfg.trace_file)
    except ValueError as exc:  # e.g. an OTEL_EXPORTER_OTLP_PROTOCOL kvr does not support
        raise SystemExit(f"kvr {name}: {exc}") from None
    log = get_logger(f"kvr.{name}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    started = False
    conn = ConnectionState()
    rt: Runtime | None = None
    waiting: dict[str, str] = {}  # why start-up waits (provisioning not permitted yet, ...)

    def status() -> dict[str, Any]:
        # Served before NATS is reachable: a 503 that says why (wrong password, untrusted CA, ...).
        body: dict[str, Any] = {}
        if rt is not None:
            try:
                body.update(app.status())
            except Exception as exc:  # noqa: BLE001 - a status page must not fail the probe
                body["status_error"] = f"{type(exc).__name__}: {exc}"
        body["nats"] = conn.snapshot()
        reason = conn.reason() if rt is None else waiting.get("reason")
        if reason is None and not started:
            reason = "starting: provisioning, catching up with the streams"
        if reason is not None:
            body["reason"] = reason
        return redact_fields(body)

    http = HealthServer(
        cfg.http_host, cfg.http_port, ready=lambda: started and app.ready(), status=status,
        digest=getattr(app, "digest", None),
    )
    port = await http.start()
    endpoints = ["/healthz", "/readyz", "/metrics", *(["/digest"] if hasattr(app, "digest") else [])]
    log.info("http.listening", port=port, endpoints=endpoints)

    nc = await _connect_or_stop(cfg.nats_url, f"kvr-{name}", stop, NatsAuth.from_cfg(cfg), conn)
    if nc is None:
        await http.stop()
        return 0
    rt = Runtime(name, cfg, nc)
    rt.stopping = stop
    try:
        if cfg.provision:
            result = await _provision_or_wait(rt, cfg, conn, stop, waiting)
            if result is None:  # stopped while waiting
                await _close(nc, app, http)
                return 0
            waiting.pop("reason", None)
            log.info("provision.done", **result)
        await app.start(rt)
        started = True
        frozen = freeze_startup_heap()
        log.info("service.started", pools=rt.pools, nats=redact_url(cfg.nats_url), gc_frozen_objects=frozen)
        await stop.wait()
        log.info("service.stopping")
    except Exception:
        log.exception("service.failed")
        await _close(nc, app, http)
        return 1
    await _close(nc, app, http)
    log.info("service.stopped")
    return 0


async def _provision_or_wait(
    rt: Runtime, cfg: ServiceConfig, conn: ConnectionState, stop: asyncio.Event, waiting: dict[str, str]
) -> dict[str, str] | None:
    """Provision. When this NATS user may not create what is missing (a least-privilege identity
    before `kvr provision` ran) or JetStream does not answer, say why in `/readyz` and in one log
    line per cause, and retry with backoff until the streams exist; None if stopped meanwhile. An
    existing stream with a conflicting configuration stays fatal (ProvisioningError)."""
    log = get_logger("kvr.provision")
    delay, said = 1.0, None
    while not stop.is_set():
        try:
            return await provision(rt.js, rt.names, stream_settings(cfg))
        except ProvisioningError:
            raise
        except Exception as exc:  # noqa: BLE001 - permission refusals surface as request timeouts
            refused = sorted(s for s in conn.denied.get("publish", set()) if s.startswith("$js.api.stream."))
            if refused:
                reason = (f"this NATS user may not create what is missing ({', '.join(refused)}): "
                          "run `kvr provision` with the provisioner identity (docs/security.md)")
            else:
                reason = f"provisioning failed: {type(exc).__name__}: {exc}"
            waiting["reason"] = reason
            if reason != said:
                said = reason
                log.error("provision.waiting", reason=reason, retry_in_s=delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 30.0)
    return None


async def _connect_or_stop(url: str, name: str, stop: asyncio.Event, auth: NatsAuth, state: ConnectionState) -> NATS | None:
    connect_task = asyncio.create_task(connect(url, name, auth=auth, state=state))
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({connect_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if connect_task in done:
        stop_task.cancel()
        return connect_task.result()
    await cancel_and_wait(connect_task)
    return None


async def _close(nc: NATS, app: ServiceApp, http: HealthServer) -> None:
    try:
        # An app that drains client streams on stop says how long it may take (`stop_timeout_s`).
        await asyncio.wait_for(app.stop(), getattr(app, "stop_timeout_s", 10))
    except Exception:  # noqa: BLE001
        get_logger("kvr").exception("service.stop_failed")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), 5)
    await http.stop()
    shutdown_tracing()


C = TypeVar("C", bound=ServiceConfig)


def main_for(
    name: str,
    description: str,
    config: type[C],
    make_app: Callable[[C], ServiceApp],
    argv: Sequence[str] | None = None,
) -> int:
    parser = build_parser(f"kvr {name}", description, config.settings())
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args, config)
    except ValueError as exc:  # a value out of its setting's range (the config refuses it when built)
        parser.error(str(exc))
    try:
        return asyncio.run(run_app(name, cfg, make_app(cfg)))
    except KeyboardInterrupt:
        return 0

