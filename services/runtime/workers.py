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
from schemas.discovery import WorkerRecord, worker_key
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

    def is_live(self, now: int) -> bool:
        """The one liveness rule (docs/protocol.md §3): younger than its own `ttl_s`, by its
        `heartbeat_ms` on the local clock (or since first seen when that is 0). A record past it is
        deleted from the bucket by whichever replica notices first (`WorkerWatcher`)."""
        return self.age_ms(now) < self.record.ttl_s * 1000.0


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
        return [e for e in self.workers.values() if not e.is_live(now)]

    def live(self, pool: str, now: int | None = None) -> list[WorkerRecord]:
        """The pool's records by worker id; with `now`, only the live ones (without: every record
        the bucket holds, i.e. not deleted yet)."""
        out = [e.record for (p, _), e in self.workers.items() if p == pool and (now is None or e.is_live(now))]
        out.sort(key=lambda r: r.worker_id)
        return out

    def pools(self) -> set[str]:
        return {p for p, _ in self.workers}


class Tombstones:
    """Workers of one pool whose discovery key was deleted and not put since (pure).

    The discovery bucket and the streams that carry a worker's state (KV events, bookings) are
    different streams, so a replica may see a removed worker's last events before or after its
    delete. A fold drops the worker's state at the delete and ignores its events while it is
    tombstoned, so replicas end without that worker's state whatever the interleaving (on a restart
    the bucket, delete markers included, is replayed before the streams). Shared by the indexer's
    admission and the scheduler's bookings.
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: set[int] = set()

    def remove(self, worker_id: int) -> None:
        """Discovery deleted the worker (also one never seen: a replayed delete marker)."""
        self._ids.add(worker_id)

    def put(self, worker_id: int) -> bool:
        """Discovery put the worker (again): its events count from now on. True if it was removed."""
        if worker_id in self._ids:
            self._ids.discard(worker_id)
            return True
        return False

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def parse_key(key: str) -> tuple[str, int] | None:
    pool, _, wid = key.rpartition(".")
    worker_id = parse_id(wid, (1 << 53) - 1)
    if not pool or worker_id is None:
        return None
    return pool, worker_id


OnPut = Callable[[WorkerRecord, bool], None]
OnRemove = Callable[[str, int], None]


class WorkerWatcher:
    """Follow KVR_WORKERS for some pools; call back on added/updated/removed workers.

    One per process (`Runtime.discovery()`), shared by every component of it: each `listen`s before
    the watcher starts (a listener added later would miss the history replayed at start), then
    `start()` / `stop()` are counted, so the stream is followed once and until the last user stops.
    Removals are reported also for workers never seen (delete markers replayed at start: a snapshot
    may hold workers deleted while the process was down)."""

    def __init__(
        self,
        nc: NATS,
        bucket: str,
        pools: list[str],
        *,
        on_put: OnPut | None = None,
        on_remove: OnRemove | None = None,
        expire: bool = True,
        sweep_interval_s: float = 0.5,
        max_lag_s: float = 0.0,
    ) -> None:
        self.nc = nc
        self.bucket = bucket
        self.pools = pools
        self.directory = WorkerDirectory()
        self._listeners: list[tuple[OnPut | None, OnRemove | None]] = []
        self._expire = False
        self._sweep_interval_s = sweep_interval_s
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
        self._users = 0
        self.invalid_records = 0
        if on_put is not None or on_remove is not None or expire:
            self.listen(on_put, on_remove, expire=expire)

    def listen(self, on_put: OnPut | None = None, on_remove: OnRemove | None = None, *, expire: bool = False) -> None:
        """Add a listener (called in registration order). `expire`: this user wants records past
        their TTL deleted from the bucket (the indexer and the scheduler do; the bridge alone does
        not, it may lack the permission)."""
        if self._users:
            raise RuntimeError("listen() after start(): the listener would miss the replayed history")
        if on_put is not None or on_remove is not None:
            self._listeners.append((on_put, on_remove))
        self._expire = self._expire or expire

    @property
    def caught_up(self) -> asyncio.Event:
        return self.follower.caught_up

    def ready(self) -> bool:
        """Caught up with the bucket, connected, not lagging (see `StreamFollower.ready`)."""
        return self.follower.ready()

    def start(self) -> None:
        """Start following (the first call) or count one more user (the others)."""
        self._users += 1
        if self._users > 1:
            return
        self.follower.start()
        if self._expire:
            self._sweeper = asyncio.create_task(self._sweep(), name="workers-sweep")

    async def stop(self) -> None:
        """One user less; the last one stops following."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
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
            for _, on_remove in self._listeners:
                if on_remove is not None:
                    on_remove(pool, worker_id)
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
                      worker_id=record.worker_id)
            return
        is_new = self.directory.put(record, seq, now_ms())
        if is_new:
            log.info("workers.added", pool=pool, worker_id=worker_id, role=record.role, dp_size=record.dp_size)
        for on_put, _ in self._listeners:
            if on_put is not None:
                on_put(record, is_new)

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
                    key = worker_key(entry.record.pool, entry.record.worker_id)
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
    return await kv.put(worker_key(record.pool, record.worker_id), codec.encode_json(record))


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
    await kv.delete(worker_key(pool, worker_id))
