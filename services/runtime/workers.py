"""Worker discovery shared by every service: a pure directory plus a JetStream adapter.

`WorkerDirectory` folds the records of KV bucket KVR_WORKERS (docs/protocol.md §3). `WorkerWatcher`
feeds it from the bucket's underlying stream with a `StreamFollower` (so it resumes after outages
like every other consumer) and turns expiries into key deletes: the replica that notices first
deletes the key (guarded by the revision it saw), and every replica then sees the same removal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from schemas import codec
from schemas.codec import SchemaError
from schemas.discovery import WorkerRecord
from schemas.subjects import parse_id

from .badinput import malformed
from .follower import StreamFollower
from .logs import get_logger

log = get_logger("kvr.workers")

KV_OP = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class WorkerEntry:
    record: WorkerRecord
    revision: int
    seen_ms: int

    def age_ms(self, now: int) -> int:
        # heartbeat_ms = 0 (hand-written record) → age counts from when we saw it.
        ref = self.record.heartbeat_ms or self.seen_ms
        return now - ref


class WorkerDirectory:
    """Live workers per pool. Pure: time is passed in."""

    def __init__(self) -> None:
        self.workers: dict[tuple[str, int], WorkerEntry] = {}

    def put(self, record: WorkerRecord, revision: int, now: int) -> bool:
        """Returns True when the worker is new (was not known before)."""
        key = (record.pool, record.worker_id)
        is_new = key not in self.workers
        self.workers[key] = WorkerEntry(record, revision, now)
        return is_new

    def delete(self, pool: str, worker_id: int) -> WorkerRecord | None:
        entry = self.workers.pop((pool, worker_id), None)
        return entry.record if entry else None

    def get(self, pool: str, worker_id: int) -> WorkerRecord | None:
        entry = self.workers.get((pool, worker_id))
        return entry.record if entry else None

    def expired(self, now: int) -> list[WorkerEntry]:
        return [e for e in self.workers.values() if e.age_ms(now) >= e.record.ttl_s * 1000.0]

    def live(self, pool: str, now: int | None = None) -> list[WorkerRecord]:
        out = []
        for (p, _), entry in self.workers.items():
            if p != pool:
                continue
            if now is not None and entry.age_ms(now) >= entry.record.ttl_s * 1000.0:
                continue
            out.append(entry.record)
        out.sort(key=lambda r: r.worker_id)
        return out

    def pools(self) -> set[str]:
        return {p for p, _ in self.workers}


def parse_key(key: str) -> tuple[str, int] | None:
    pool, _, wid = key.rpartition(".")
    worker_id = parse_id(wid, (1 << 53) - 1)
    if not pool or worker_id is None:
        return None
    return pool, worker_id


class WorkerWatcher:
    """Follow KVR_WORKERS for some pools; call back on added/updated/removed workers."""

    def __init__(
        self,
        nc: NATS,
        bucket: str,
        pools: list[str],
        *,
        on_put: Callable[[WorkerRecord, bool], None] | None = None,
        on_remove: Callable[[str, int], None] | None = None,
        expire: bool = True,
        sweep_interval_s: float = 0.5,
        notify_unknown_removals: bool = False,
        max_lag_s: float = 0.0,
    ) -> None:
        self.nc = nc
        self.bucket = bucket
        self.pools = pools
        self.directory = WorkerDirectory()
        self._on_put = on_put
        self._on_remove = on_remove
        self._expire = expire
        self._sweep_interval_s = sweep_interval_s
        # The indexer restores state from a snapshot that may hold workers whose key was deleted
        # before this process started; it needs the delete even though no put was seen.
        self._notify_unknown_removals = notify_unknown_removals
        self._prefix = f"$KV.{bucket}."
        self.follower = StreamFollower(
            nc,
            f"KV_{bucket}",
            [f"$KV.{bucket}.{pool}.>" for pool in pools] if "*" not in pools else [f"$KV.{bucket}.>"],
            self._apply,
            name=f"workers-{bucket}",
            batch=256,
            max_lag_s=max_lag_s,
            track_history=False,  # history 1: superseded revisions are dropped by design
        )
        self._sweeper: asyncio.Task[None] | None = None
        self.invalid_records = 0

    @property
    def caught_up(self) -> asyncio.Event:
        return self.follower.caught_up

    def ready(self) -> bool:
        """Caught up with the bucket, connected, not lagging (see `StreamFollower.ready`)."""
        return self.follower.ready()

    def start(self) -> None:
        self.follower.start()
        if self._expire:
            self._sweeper = asyncio.create_task(self._sweep(), name="workers-sweep")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        await self.follower.stop()

    def _apply(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        key = subject[len(self._prefix) :]
        parsed = parse_key(key)
        if parsed is None:
            self.invalid_records += 1
            malformed(self.follower.stream, "bad_key", "workers.bad_key", key=key[:200])
            return
        pool, worker_id = parsed
        op = (headers or {}).get(KV_OP)
        if op is None and headers and MARKER_REASON in headers:
            op = "PURGE"
        if op in ("DEL", "PURGE"):
            if self.directory.delete(pool, worker_id) is not None:
                log.info("workers.removed", pool=pool, worker_id=worker_id)
                if self._on_remove:
                    self._on_remove(pool, worker_id)
            elif self._notify_unknown_removals and self._on_remove:
                self._on_remove(pool, worker_id)
            return
        try:
            record: WorkerRecord = codec.decode(data, WorkerRecord, codec.content_type_of(headers))
        except SchemaError as exc:
            self.invalid_records += 1
            malformed(self.follower.stream, "schema", "workers.bad_record", key=key[:200], error=str(exc)[:300], size=len(data))
            return
        if record.pool != pool or record.worker_id != worker_id:
            self.invalid_records += 1
            malformed(self.follower.stream, "key_mismatch", "workers.key_mismatch", key=key[:200], pool=record.pool,
                      worker_id=record.worker_id)  # fmt: skip
            return
        is_new = self.directory.put(record, seq, now_ms())
        if is_new:
            log.info("workers.added", pool=pool, worker_id=worker_id, role=record.role, dp_size=record.dp_size)
        if self._on_put:
            self._on_put(record, is_new)

    async def _sweep(self) -> None:
        js = self.nc.jetstream()
        kv = None
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                expired = self.directory.expired(now_ms())
                if not expired:
                    continue
                if kv is None:
                    kv = await js.key_value(self.bucket)
                for entry in expired:
                    key = f"{entry.record.pool}.{entry.record.worker_id}"
                    try:
                        await kv.delete(key, last=entry.revision)
                        log.info("workers.expired", key=key, ttl_s=entry.record.ttl_s)
                    except Exception as exc:  # noqa: BLE001 - someone re-put or deleted it first
                        log.debug("workers.expire_skipped", key=key, error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("workers.sweep_failed", error=str(exc))


async def put_worker(nc: NATS, bucket: str, record: WorkerRecord) -> int:
    """Write (or heartbeat) a discovery record; returns the KV revision."""
    kv = await nc.jetstream().key_value(bucket)
    return await kv.put(f"{record.pool}.{record.worker_id}", codec.encode_json(record))


# After a failed heartbeat the next attempt comes this soon (at most one interval), not a whole
# interval later: a put that failed because the bucket's stream was electing a leader, or timed out
# (5 s) waiting for one, would otherwise leave the record unrefreshed for two intervals plus the
# timeout, i.e. a whole TTL (15 s with the default 5 s interval), and every replica would expire the
# worker and drop its blocks (seen in tests/faults/ with the node leading KV_KVR_WORKERS killed).
HEARTBEAT_RETRY_S = 0.5


async def heartbeat_loop(beat: Callable[[], Awaitable[bool]], interval_s: float, retry_s: float = HEARTBEAT_RETRY_S) -> None:
    """Forever: wait, then `beat()` (True = the record was put); `interval_s` after a good beat,
    `min(retry_s, interval_s)` after a failed one."""
    delay = interval_s
    while True:
        await asyncio.sleep(delay)
        delay = interval_s if await beat() else min(retry_s, interval_s)


async def delete_worker(nc: NATS, bucket: str, pool: str, worker_id: int) -> None:
    kv = await nc.jetstream().key_value(bucket)
    await kv.delete(f"{pool}.{worker_id}")
