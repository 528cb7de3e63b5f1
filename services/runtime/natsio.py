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


async def connect(url: str, name: str, *, connect_timeout: float = 2.0, max_wait_s: float | None = None) -> NATS:
    """Connect with retry/backoff (the server may start after us) and reconnect forever afterwards."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    delay = 0.1
    loop = asyncio.get_running_loop()
    deadline = None if max_wait_s is None else loop.time() + max_wait_s

    async def on_error(exc: Exception) -> None:
        log.warning("nats.error", error=str(exc) or type(exc).__name__)

    async def on_disconnect() -> None:
        log.warning("nats.disconnected")

    async def on_reconnect() -> None:
        log.info("nats.reconnected", url=str(nc.connected_url.geturl() if nc.connected_url else ""))

    nc = NATS()
    while True:
        try:
            await nc.connect(
                servers=servers,
                name=name,
                connect_timeout=connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                pending_size=64 * 1024 * 1024,
            )
            log.info("nats.connected", url=servers)
            return nc
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server is retried
            if deadline is not None and loop.time() >= deadline:
                raise
            log.warning("nats.connect_failed", error=str(exc) or type(exc).__name__, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay + random.random() * delay * 0.2)
            delay = min(delay * 2, 5.0)
            nc = NATS()


@dataclass(frozen=True)
class StreamSettings:
    kv_max_age_s: float = 3600.0
    bookings_max_age_s: float = 600.0
    replicas: int = 1
    duplicate_window_s: float = 120.0


def stream_configs(names: Names, settings: StreamSettings) -> list[StreamConfig]:
    common = dict(
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        num_replicas=settings.replicas,
        duplicate_window=settings.duplicate_window_s,
    )
    return [
        StreamConfig(name=names.kv_stream, subjects=names.kv_stream_subjects(), max_age=settings.kv_max_age_s, **common),
        StreamConfig(
            name=names.bookings_stream,
            subjects=names.bookings_stream_subjects(),
            max_age=settings.bookings_max_age_s,
            **common,
        ),
    ]


def _differences(want: StreamConfig, have: StreamConfig) -> list[str]:
    diffs = []
    if sorted(want.subjects or []) != sorted(have.subjects or []):
        diffs.append(f"subjects: want {want.subjects}, have {have.subjects}")
    for attr in ("storage", "retention", "num_replicas"):
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


__all__ = ["NATS", "ProvisioningError", "StreamSettings", "connect", "ensure_stream", "provision", "stream_configs", "nats"]
