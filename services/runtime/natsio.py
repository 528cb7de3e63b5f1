"""NATS connection and idempotent provisioning of the streams, bucket and object store (docs/protocol.md §1)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from schemas.subjects import Names

from .logs import get_logger

log = get_logger("kvr.nats")


class ProvisioningError(RuntimeError):
    """An existing stream/bucket whose configuration conflicts with what this service needs."""


class NatsUnreachable(ConnectionError):
    """No NATS server answered within a bounded connect's `max_wait_s`; the message is one line."""


async def connect(url: str, name: str, *, connect_timeout: float = 2.0, max_wait_s: float | None = None) -> NATS:
    """Connect with retry/backoff (the server may start after us) and reconnect forever afterwards.

    Unbounded (`max_wait_s=None`, services): every failed round is logged and retried. Bounded
    (clients): nothing is logged; after `max_wait_s` it raises `NatsUnreachable` with the last cause,
    so a command-line client can print one line. nats-py's own retry loop is switched off for the
    first connect (its `max_reconnect_attempts=0` means *unlimited*, and a refused connection would
    loop inside `nc.connect` for ever); reconnecting is switched on once connected.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    delay = 0.1
    loop = asyncio.get_running_loop()
    deadline = None if max_wait_s is None else loop.time() + max_wait_s
    last_error: BaseException | None = None
    connected = False

    async def on_error(exc: Exception) -> None:
        nonlocal last_error
        if not connected:
            last_error = exc  # a failed first attempt: reported once, below
            return
        log.warning("nats.error", error=str(exc) or type(exc).__name__)

    async def on_disconnect() -> None:
        if not connected:  # a failed first attempt being cleaned up
            return
        if nc.is_closed:  # our own close/drain at shutdown, not a lost connection
            log.info("nats.closed")
        else:
            log.warning("nats.disconnected")

    async def on_reconnect() -> None:
        log.info("nats.reconnected", url=str(nc.connected_url.geturl() if nc.connected_url else ""))

    while True:
        nc = NATS()
        last_error = None
        remaining = None if deadline is None else max(deadline - loop.time(), 0.05)
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    connect_timeout=connect_timeout if remaining is None else min(connect_timeout, remaining),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # nats-py: each server tried twice, then NoServersError
                    reconnect_time_wait=0,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    pending_size=64 * 1024 * 1024,
                ),
                remaining,
            )
            nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1)
            connected = True
            log.info("nats.connected", url=[_without_userinfo(s) for s in servers])
            return nc
        except asyncio.CancelledError:
            await _close_quietly(nc)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server is retried
            await _close_quietly(nc)
            cause = _describe(last_error if isinstance(exc, nats.errors.NoServersError) and last_error else exc)
            if deadline is not None:
                if loop.time() >= deadline - 0.01:
                    where = ", ".join(_without_userinfo(s) for s in servers)
                    raise NatsUnreachable(f"cannot reach NATS at {where} within {max_wait_s:g} s ({cause})") from None
            else:
                log.warning("nats.connect_failed", error=cause, retry_in_s=round(delay, 2))
            pause = delay + random.random() * delay * 0.2
            if deadline is not None:
                pause = min(pause, max(deadline - loop.time(), 0.0))
            await asyncio.sleep(pause)
            delay = min(delay * 2, 5.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _without_userinfo(server: str) -> str:
    """A server URL fit for a log line or an error message (credentials in it are dropped)."""
    scheme, sep, rest = server.rpartition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}{sep}{host}" if sep else host


async def _close_quietly(nc: NATS) -> None:
    try:
        if not nc.is_closed:
            await asyncio.wait_for(nc.close(), 2)
    except Exception:  # noqa: BLE001 - a half-open client; nothing left to release
        pass


KV_MAX_BYTES = 1 << 30
BOOKINGS_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class StreamSettings:
    kv_max_age_s: float = 3600.0
    bookings_max_age_s: float = 600.0
    replicas: int = 1
    duplicate_window_s: float = 120.0
    kv_max_bytes: int = KV_MAX_BYTES  # <= 0: no byte limit
    bookings_max_bytes: int = BOOKINGS_MAX_BYTES


def _max_bytes(value: int) -> int:
    return value if value > 0 else -1


def stream_configs(names: Names, settings: StreamSettings) -> list[StreamConfig]:
    """KVR_KV discards the *oldest* events when full: every replica has applied them already and the
    indexer's snapshots carry their effect; a replica that would need them to restore is told
    (`history_lost`). KVR_BOOKINGS refuses *new* bookings when full: it is the only copy of the
    replicated load (no snapshot), so dropping old adds would silently under-count load on every
    replica that starts later; a refused publish is an explicit `overloaded` instead. Sizing:
    docs/deploy.md, "Retention and stream limits"."""
    common = dict(
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        num_replicas=settings.replicas,
        duplicate_window=settings.duplicate_window_s,
    )
    return [
        StreamConfig(
            name=names.kv_stream,
            subjects=names.kv_stream_subjects(),
            max_age=settings.kv_max_age_s,
            max_bytes=_max_bytes(settings.kv_max_bytes),
            discard=DiscardPolicy.OLD,
            **common,
        ),
        StreamConfig(
            name=names.bookings_stream,
            subjects=names.bookings_stream_subjects(),
            max_age=settings.bookings_max_age_s,
            max_bytes=_max_bytes(settings.bookings_max_bytes),
            discard=DiscardPolicy.NEW,
            **common,
        ),
    ]


def _differences(want: StreamConfig, have: StreamConfig) -> list[str]:
    diffs = []
    if sorted(want.subjects or []) != sorted(have.subjects or []):
        diffs.append(f"subjects: want {want.subjects}, have {have.subjects}")
    w_bytes, h_bytes = _max_bytes(want.max_bytes or -1), _max_bytes(have.max_bytes or -1)
    if w_bytes != h_bytes:
        diffs.append(f"max_bytes: want {w_bytes}, have {h_bytes}")
    for attr in ("storage", "retention", "discard", "num_replicas"):
        w, h = getattr(want, attr), getattr(have, attr)
        if w is not None and w != h:
            diffs.append(f"{attr}: want {getattr(w, 'value', w)}, have {getattr(h, 'value', h)}")
    for attr in ("max_age", "duplicate_window"):
        w, h = float(getattr(want, attr) or 0), float(getattr(have, attr) or 0)
        if abs(w - h) > 1e-3:
            diffs.append(f"{attr}: want {w:g}s, have {h:g}s")
    return diffs


async def ensure_stream(js: JetStreamContext, want: StreamConfig) -> str:
    """Create the stream if missing; same config → no-op; conflicting config → ProvisioningError."""
    try:
        info = await js.stream_info(want.name)  # type: ignore[arg-type]
    except NotFoundError:
        try:
            await js.add_stream(want)
            log.info("provision.stream_created", stream=want.name, subjects=want.subjects)
            return "created"
        except Exception:  # noqa: BLE001 - a concurrent creator may have won; fall through to compare
            info = await js.stream_info(want.name)  # type: ignore[arg-type]
    diffs = _differences(want, info.config)
    if diffs:
        raise ProvisioningError(f"stream {want.name} exists with a conflicting configuration: " + "; ".join(diffs))
    return "exists"


async def ensure_workers_bucket(js: JetStreamContext, bucket: str, replicas: int = 1) -> str:
    try:
        kv = await js.key_value(bucket)
        status = await kv.status()
        history = status.history
        if history != 1:
            raise ProvisioningError(f"KV bucket {bucket} exists with history {history}, want 1")
        return "exists"
    except BucketNotFoundError:
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas))
        log.info("provision.bucket_created", bucket=bucket)
        return "created"


async def ensure_object_store(js: JetStreamContext, bucket: str, replicas: int = 1) -> str:
    try:
        await js.object_store(bucket)
        return "exists"
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(bucket, ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas))
        log.info("provision.object_store_created", bucket=bucket)
        return "created"


async def provision(js: JetStreamContext, names: Names, settings: StreamSettings) -> dict[str, str]:
    """Idempotently create everything of docs/protocol.md §1; returns name → created/exists."""
    result: dict[str, str] = {}
    for cfg in stream_configs(names, settings):
        result[cfg.name] = await ensure_stream(js, cfg)  # type: ignore[index]
    result[names.workers_bucket] = await ensure_workers_bucket(js, names.workers_bucket, settings.replicas)
    result[names.snapshots_bucket] = await ensure_object_store(js, names.snapshots_bucket, settings.replicas)
    return result


__all__ = [
    "NATS", "NatsUnreachable", "ProvisioningError", "StreamSettings", "connect", "ensure_stream", "provision", "stream_configs", "nats",
]  # fmt: skip
