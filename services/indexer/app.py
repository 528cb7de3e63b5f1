"""The indexer's imperative shell: KVR_KV → PrefixIndex per pool, discovery → worker removal,
snapshots to KVR_SNAPSHOTS, and the indexer.match / indexer.dump endpoints.

Start order matters for determinism: snapshots are loaded first, then the discovery watcher catches
up (so removed workers are known before any tail event is applied), then the KV follower resumes at
the oldest covered sequence + 1. Events of a worker whose discovery key is deleted are ignored until
the worker is put again: KV events and discovery live on different streams, so a replica may see a
removed worker's last events before or after the delete; dropping them after it makes every replica
(running or restarted) end with none of that worker's blocks, whatever the interleaving.

Which messages reach the index at all (subject binding, workers not in discovery yet, per-worker
caps) is decided by the pure `admission.Admission`; this shell carries out its answers: apply, hold,
re-read the stream from a sequence (`StreamFollower.rewind`), or look a worker up in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Annotated, Any

from msgspec import Meta
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from schemas import codec
from schemas.api import DumpReply, DumpRequest, MatchReply, MatchRequest, WorkerScore
from schemas.codec import SchemaError
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, salt_seed
from schemas.types import MAX_EVENTS_PER_MESSAGE
from services.runtime.badinput import malformed
from services.runtime.follower import StreamFollower
from services.runtime.logs import get_logger
from services.runtime.responder import ServiceError, serve, unsubscribe_all
from services.runtime.service import Runtime
from services.runtime.workers import WorkerWatcher
from services.runtime.tasks import cancel_and_wait

from . import metrics as m
from . import snapshot
from .admission import Admission, Admit, CapPolicy, Held, Verdict, binding_error, parse_kv_subject
from .index import OverlapScores, PrefixIndex
from .settings import setting

log = get_logger("kvr.indexer")
SNAPSHOT_RETRY_MAX_S = 60.0

KvPayload = RouterEvent | Annotated[list[RouterEvent], Meta(max_length=MAX_EVENTS_PER_MESSAGE)]
QUEUE = "indexer"
REPORTED_TIERS = ("host_pinned", "disk")


@dataclass
class PoolState:
    pool: str
    index: PrefixIndex = field(default_factory=PrefixIndex)
    covered_seq: int = 0  # messages up to here are already in the restored snapshot
    block_size: int | None = None  # from discovery; all workers of a pool share it
    events_since_snapshot: int = 0
    snapshot_time: float = 0.0  # wall time of the last snapshot written or loaded
    snapshot_seq: int = 0
    last_snapshot_attempt: float = 0.0
    restored_seq: int = 0
    match_seconds: Any = None  # the pool's child of the match-latency histogram
    malformed: int = 0  # messages refused: undecodable, invalid, or not matching their subject
    history_lost: int = 0  # stream sequences missing between the snapshot and the stream's first message
    dropped: int = 0  # messages of removed workers, ignored
    sizes_cache: tuple[int, list[WorkerScore]] = (-1, [])  # (index version, tree_sizes as reply items)
    snapshot_failures: int = 0  # consecutive failed snapshot writes (reset by a good one)
    snapshot_retry_at: float = 0.0  # monotonic time before which a failed snapshot is not retried


def _scores(d: dict[tuple[int, int], int]) -> list[WorkerScore]:
    return [WorkerScore(worker_id=k[0], dp_rank=k[1], blocks=v) for k, v in sorted(d.items())]


class IndexerApp:
    """One prefix index per served pool. Usable standalone (`kvr indexer`) or embedded: construct with
    a resolved config, `await start(rt)` with the host's Runtime, call `match()` directly."""

    def __init__(self, cfg: SimpleNamespace, *, serve_endpoints: bool | None = None) -> None:
        self.cfg = cfg
        self.pools: list[str] = list(cfg.pool)
        self._states = {p: PoolState(p, match_seconds=m.MATCH_SECONDS.labels(p)) for p in self.pools}
        self.default_block_size = int(setting(cfg, "block_size"))
        self.snapshot_every = int(setting(cfg, "snapshot_every_events"))
        self.snapshot_interval = float(setting(cfg, "snapshot_interval_s"))
        self.restore = bool(setting(cfg, "snapshot_restore"))
        self.serve_endpoints = bool(setting(cfg, "serve_endpoints")) if serve_endpoints is None else serve_endpoints
        self.batch = int(setting(cfg, "follower_batch"))
        self.lag_interval = float(setting(cfg, "lag_interval_s"))
        self.follower_max_bytes = int(setting(cfg, "follower_max_bytes"))
        self.max_lag = float(getattr(cfg, "max_ready_lag_s", 0.0))
        self.admission = Admission(
            self.pools,
            buffer_bytes=int(setting(cfg, "unknown_worker_buffer_bytes")),
            max_tracked=int(setting(cfg, "unknown_workers_tracked")),
            caps=CapPolicy(
                headroom=float(setting(cfg, "worker_blocks_headroom")),
                lower_tier_factor=float(setting(cfg, "worker_lower_tier_blocks_factor")),
                default_blocks=int(setting(cfg, "worker_default_max_blocks")),
            ),
        )
        self._probes: set[asyncio.Task[None]] = set()
        self.applied_seq = 0
        self.stream_last_seq = 0
        self.rt: Runtime | None = None
        self.follower: StreamFollower | None = None
        self.watcher: WorkerWatcher | None = None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._prefix = ""
        self._kv_stream = "KVR_KV"
        self._snapshot_lock = asyncio.Lock()
        # While a snapshot is serialised in pieces the index must not change: the follower is paused
        # and discovery callbacks queue here, in arrival order (a re-put must follow its delete).
        self._held_discovery: list[Callable[[], None]] | None = None
        self._serving = False  # caught up (and, when serving endpoints, subscribed)
        m.APPS.add(self)

    # ---- ServiceApp ---------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        names = rt.names
        m.init_pools(rt.pools)
        self._prefix = names.prefix + "."
        self._kv_stream = names.kv_stream
        if self.restore:
            await self._restore_snapshots()
        self.watcher = WorkerWatcher(
            rt.nc, names.workers_bucket, self.pools, on_put=self._on_worker_put, on_remove=self._on_worker_remove,
            notify_unknown_removals=True, max_lag_s=self.max_lag,
        )  # fmt: skip
        start_seq = min(st.covered_seq for st in self._states.values()) + 1
        self.applied_seq = start_seq - 1
        first_seq = await self._check_history(start_seq)
        # The follower exists before discovery is replayed: admitting a worker may rewind it.
        self.follower = StreamFollower(
            rt.nc, names.kv_stream, [names.kv_filter(p) for p in self.pools], self._on_kv,
            start_seq=max(start_seq, first_seq), batch=self.batch, max_bytes=self.follower_max_bytes,
            max_lag_s=self.max_lag, name="indexer-kv", on_history_lost=self._on_history_lost,
        )  # fmt: skip
        self.watcher.start()
        self._tasks.append(asyncio.create_task(self._start_follower_after_discovery(), name="indexer-follow"))
        self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="indexer-snapshots"))
        self._tasks.append(asyncio.create_task(self._lag_loop(), name="indexer-lag"))
        log.info("indexer.started", pools=self.pools, resume_seq=start_seq, serve_endpoints=self.serve_endpoints)

    async def stop(self) -> None:
        await unsubscribe_all(self._subs)
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(list(self._probes))
        if self.follower is not None:
            await self.follower.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        # A clean stop leaves a fresh snapshot so the next start replays as little as possible.
        if self.rt is not None and self.snapshot_enabled and self._serving and not self._busy_backfilling():
            for st in self._states.values():
                if st.events_since_snapshot:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._write_snapshot(st), 5)

    async def _serve_endpoints(self) -> None:
        assert self.rt is not None
        nc, names = self.rt.nc, self.rt.names
        for pool in self.pools:
            self._subs.append(await serve(nc, names.match(pool), MatchRequest, self._match_handler(pool), queue=QUEUE, endpoint="indexer.match"))
            self._subs.append(await serve(nc, names.dump(pool), DumpRequest, self._dump_handler(pool), queue=QUEUE, endpoint="indexer.dump"))

    def ready(self) -> bool:
        """Caught up with discovery and KV (server's account), connected, not lagging."""
        return (
            self._serving
            and self.follower is not None
            and self.follower.ready()
            and self.watcher is not None
            and self.watcher.ready()
        )

    def status(self) -> dict[str, Any]:
        pools = {}
        for pool, st in self._states.items():
            idx = st.index
            adm = self.admission.pools[pool]
            pools[pool] = {
                "blocks": idx.tier_blocks(),
                "nodes": idx.nodes,
                "workers": len(idx.worker_keys()),
                "block_size": self.block_size(pool),
                "restored_seq": st.restored_seq,
                "snapshot_seq": st.snapshot_seq,
                "events_since_snapshot": st.events_since_snapshot,
                "malformed_messages": st.malformed,
                "dropped_messages": st.dropped,
                "history_lost": st.history_lost,
                "event_id_gaps": idx.gaps,
                "events": {f"{t}.{o}": n for (t, o), n in idx.counters.items() if n},
                "unknown_workers": {
                    "tracked": len(adm.first_seq),
                    "held_messages": len(adm.held),
                    "held_bytes": adm.held_bytes,
                    "floor": adm.floor,
                    "probing": len(adm.probing),
                    **adm.counts,
                },
            }
        return {
            "applied_seq": self.applied_seq,
            "stream_last_seq": self.stream_last_seq,
            "pending": self.follower.pending if self.follower else None,
            "followers": {
                "kv": self.follower.state() if self.follower else None,
                "workers": self.watcher.follower.state() if self.watcher else None,
            },
            "pools": pools,
        }

    # ---- public, synchronous API (also used in-process by the scheduler) ----------------------

    @property
    def snapshot_enabled(self) -> bool:
        return self.snapshot_every > 0 or self.snapshot_interval > 0

    def pool_states(self) -> dict[str, PoolState]:
        return self._states

    def index(self, pool: str) -> PrefixIndex:
        return self._state(pool).index

    def block_size(self, pool: str) -> int:
        return self._state(pool).block_size or self.default_block_size

    def overlap_scores(self, pool: str, hashes: list[int], early_exit: bool = False) -> OverlapScores:
        """The index's answer for local block hashes, without the wire types (embedded callers)."""
        st = self._state(pool)
        started = time.perf_counter()
        res = st.index.find_matches(hashes, early_exit)
        st.match_seconds.observe(time.perf_counter() - started)
        return res

    def match(self, pool: str, req: MatchRequest) -> MatchReply:
        st = self._state(pool)
        bs = st.block_size or self.default_block_size
        if req.block_hashes is not None:
            hashes = req.block_hashes
        else:
            hashes = local_block_hashes(req.token_ids or [], bs, salt_seed(req.lora_name, req.cache_salt))
        index = st.index
        res = self.overlap_scores(pool, hashes, req.early_exit)
        if res.tier_scores:
            tiers = {t: _scores(res.tier_scores.get(t, {})) for t in REPORTED_TIERS}
            if "external" in res.tier_scores:
                tiers["external"] = _scores(res.tier_scores["external"])
        else:
            tiers = {t: [] for t in REPORTED_TIERS}
        version, sizes = st.sizes_cache
        if version != index.version:  # tree sizes change only with events, not per request
            sizes = _scores(res.tree_sizes)
            st.sizes_cache = (index.version, sizes)
        return MatchReply(block_size=bs, scores=_scores(res.scores), tier_scores=tiers, tree_sizes=sizes, stream_seq=self.applied_seq)

    def dump(self, pool: str) -> DumpReply:
        return DumpReply(stream_seq=self.applied_seq, events=self._state(pool).index.dump())

    def digest(self) -> dict[str, Any]:
        """Per pool, the digest of the index and its block count, at `applied_seq` (`GET /digest`).
        Replicas that applied the same stream prefix report the same digests. Costs one dump of
        every index: for comparing replicas (tests, benchmarks, an operator), not for probes."""
        pools = {pool: {"index": st.index.digest(), "blocks": st.index.tier_blocks()} for pool, st in self._states.items()}
        return {"applied_seq": self.applied_seq, "pools": pools}

    def _state(self, pool: str) -> PoolState:
        st = self._states.get(pool)
        if st is None:
            raise ServiceError("not_found", f"pool {pool!r} is not served by this indexer")
        return st

    def _match_handler(self, pool: str):  # noqa: ANN202
        async def handle(req: MatchRequest, _msg: Msg) -> MatchReply:
            return self.match(pool, req)

        return handle

    def _dump_handler(self, pool: str):  # noqa: ANN202
        async def handle(_req: DumpRequest, msg: Msg) -> DumpReply:
            reply = self.dump(pool)
            limit = self.rt.nc.max_payload if self.rt is not None else 0
            if limit:
                size = len(codec.encode(reply, codec.content_type_of(msg.headers)))
                if size > limit:
                    # A reply over the server's max_payload would be dropped and the caller time out.
                    raise ServiceError(
                        "overloaded", f"dump of {len(reply.events)} events is {size} bytes, over the NATS max_payload of {limit}"
                    )
            return reply

        return handle

    # ---- KV events ----------------------------------------------------------------------------

    def _pool_of(self, subject: str) -> str | None:
        if not subject.startswith(self._prefix):
            return None
        rest = subject[len(self._prefix) :]
        return rest.split(".", 1)[0]

    def _on_kv(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if seq > self.applied_seq:
            self.applied_seq = seq
        parsed = parse_kv_subject(subject, self._prefix[:-1])
        if parsed is None:
            pool = self._pool_of(subject)
            st = self._states.get(pool) if pool is not None else None
            if st is not None:
                st.malformed += 1
                m.MESSAGES.labels(st.pool, "bad_subject").inc()
                malformed(self._kv_stream, "bad_subject", "kv.bad_subject", pool=st.pool, seq=seq, subject=subject[:200])
            return
        pool, worker_id, dp_rank = parsed
        st = self._states.get(pool)
        if st is None:
            return
        verdict = self.admission.route(pool, seq, worker_id)
        if verdict is Verdict.APPLY:
            self._apply_message(st, seq, worker_id, dp_rank, data, codec.content_type_of(headers))
        elif verdict is Verdict.HOLD:
            m.MESSAGES.labels(pool, "held").inc()
            self.admission.hold(pool, Held(seq, worker_id, dp_rank, bytes(data), codec.content_type_of(headers)))
        elif verdict is Verdict.REMOVED:
            st.dropped += 1
            m.MESSAGES.labels(pool, "removed_worker").inc()
        else:
            m.MESSAGES.labels(pool, "skipped_covered" if seq <= st.covered_seq else "skipped_replayed").inc()

    def _apply_message(self, st: PoolState, seq: int, worker_id: int, dp_rank: int, data: bytes, ctype: str | None) -> None:
        pool = st.pool
        try:
            payload: RouterEvent | list[RouterEvent] = codec.decode(data, KvPayload, ctype)
        except SchemaError as exc:
            st.malformed += 1
            m.MESSAGES.labels(pool, "malformed").inc()
            malformed(self._kv_stream, "schema", "kv.malformed", pool=pool, seq=seq, error=str(exc)[:300], size=len(data))
            return
        events = payload if isinstance(payload, list) else (payload,)
        wrong = binding_error(events, worker_id, dp_rank)
        if wrong is not None:
            st.malformed += 1
            m.MESSAGES.labels(pool, "subject_mismatch").inc()
            malformed(self._kv_stream, "subject_mismatch", "kv.subject_mismatch", pool=pool, seq=seq, error=wrong)
            return
        index = st.index
        cap = self.admission.cap
        for ev in events:
            if index.apply(ev, cap(pool, worker_id, ev.storage_tier)) == "over_capacity":
                m.DROPPED_EVENTS.labels(pool, "over_capacity").inc()
        st.events_since_snapshot += len(events)
        m.MESSAGES.labels(pool, "ok").inc()

    def _carry_out(self, pool: str, worker_id: int, admit: Admit) -> None:
        """Do what admitting a worker requires (see `Admission.put`)."""
        st = self._states[pool]
        for held in admit.apply:
            self._apply_message(st, held.seq, held.worker_id, held.dp_rank, held.data, held.content_type)
        if admit.rewind_from is not None:
            assert self.follower is not None
            self.admission.begin_replay(pool, worker_id, admit.rewind_from, self.applied_seq)
            m.BACKFILLS.labels(pool, "rewind").inc()
            log.info("indexer.worker_backfill", pool=pool, worker_id=worker_id, from_seq=admit.rewind_from, up_to=self.applied_seq)
            self.follower.rewind(admit.rewind_from)
        if admit.probe_from is not None:
            m.BACKFILLS.labels(pool, "probe").inc()
            self._start_probe(pool, worker_id, admit.probe_from)

    def _start_probe(self, pool: str, worker_id: int, from_seq: int) -> None:
        task = asyncio.create_task(self._probe(pool, worker_id, from_seq), name="indexer-probe")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, pool: str, worker_id: int, from_seq: int) -> None:
        """The worker's first message at or after `from_seq`, straight from the stream."""
        assert self.rt is not None
        subject = self.rt.names.kv_subject(pool, worker_id, 0).rsplit(".", 1)[0] + ".*"
        backoff = 0.1
        while True:
            try:
                found: int | None = (await self.rt.js.get_msg(self._kv_stream, seq=max(1, from_seq), subject=subject, next=True)).seq
                break
            except NotFoundError:
                found = None
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker stays held until the stream answers
                log.warning("indexer.probe_failed", pool=pool, worker_id=worker_id, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        self._discovery_change(partial(self._probe_done, pool, worker_id, found))

    def _probe_done(self, pool: str, worker_id: int, found: int | None) -> None:
        self._carry_out(pool, worker_id, self.admission.probe_result(pool, worker_id, found))

    def _on_history_lost(self, from_seq: int, count: int) -> None:
        for pool, st in self._states.items():
            st.history_lost += count
            m.HISTORY_LOST.labels(pool).inc()
            log.error(
                "indexer.history_lost", pool=pool, missing_from=from_seq, missing=count,
                hint="KVR_KV dropped events before this replica applied them (max_bytes or max_age too small for its lag)",
            )  # fmt: skip

    async def _start_follower_after_discovery(self) -> None:
        assert self.watcher is not None and self.follower is not None
        await self.watcher.caught_up.wait()
        while self._probes:  # workers registered while we were down: look their early messages up first
            await asyncio.wait(list(self._probes))
        self.follower.start()
        await self.follower.caught_up.wait()
        if self.serve_endpoints:
            # Subscribed only once caught up: the queue group never routes a match to a replica that
            # is still replaying its backlog and would under-report overlaps.
            await self._serve_endpoints()
        self._serving = True
        for pool, st in self._states.items():
            log.info("indexer.caught_up", pool=pool, applied_seq=self.applied_seq, blocks=st.index.blocks, nodes=st.index.nodes)

    # ---- discovery ----------------------------------------------------------------------------

    def _discovery_change(self, call: Callable[[], None]) -> None:
        """Run now, or after the snapshot being serialised (in arrival order)."""
        if self._held_discovery is not None:
            self._held_discovery.append(call)
        else:
            call()

    def _on_worker_put(self, record: WorkerRecord, is_new: bool) -> None:
        if self._held_discovery is not None:
            self._held_discovery.append(partial(self._on_worker_put, record, is_new))
            return
        st = self._states.get(record.pool)
        if st is None:
            return
        if st.block_size != record.block_size:
            if st.block_size is not None:
                log.warning("indexer.block_size_changed", pool=record.pool, old=st.block_size, new=record.block_size)
            st.block_size = record.block_size
        self._carry_out(record.pool, record.worker_id, self.admission.put(record.pool, record.worker_id, record.total_kv_blocks))

    def _on_worker_remove(self, pool: str, worker_id: int) -> None:
        if self._held_discovery is not None:
            self._held_discovery.append(partial(self._on_worker_remove, pool, worker_id))
            return
        st = self._states.get(pool)
        if st is None:
            return
        self.admission.remove(pool, worker_id)
        dropped = st.index.remove_worker(worker_id)
        st.events_since_snapshot += 1
        log.info("indexer.worker_removed", pool=pool, worker_id=worker_id, blocks_dropped=dropped)

    # ---- snapshots ----------------------------------------------------------------------------

    async def _restore_snapshots(self) -> None:
        assert self.rt is not None
        names = self.rt.names
        for pool in self._states:
            try:
                loaded = await snapshot.load(self.rt.js, names.snapshots_bucket, names.snapshot_object(pool))
            except ValueError as exc:
                log.error("snapshot.corrupt", pool=pool, error=str(exc))
                continue
            if loaded is None:
                log.info("snapshot.none", pool=pool)
                continue
            self.restore_pool(pool, loaded)
            m.RESTORE_SECONDS.labels(pool).set(loaded.seconds)
            log.info(
                "snapshot.restored", pool=pool, stream_seq=loaded.stream_seq, bytes=loaded.size,
                blocks=loaded.index.blocks, seconds=round(loaded.seconds, 3),
            )  # fmt: skip

    def restore_pool(self, pool: str, loaded: snapshot.LoadedSnapshot) -> None:
        """Take a pool's state from a snapshot (before discovery and the stream are followed)."""
        st = self._states[pool]
        st.index = loaded.index
        st.sizes_cache = (-1, [])
        st.covered_seq = st.restored_seq = st.snapshot_seq = loaded.stream_seq
        self.admission.restore(pool, loaded.admission, covered=loaded.stream_seq)
        st.snapshot_time = loaded.written_at or time.time()

    async def _check_history(self, start_seq: int) -> int:
        """Loudly report when the stream no longer holds events we need (max_age passed them);
        returns the stream's first sequence (the follower reports what it loses from there on)."""
        assert self.rt is not None
        try:
            info = await self.rt.js.stream_info(self.rt.names.kv_stream)
        except Exception as exc:  # noqa: BLE001 - the follower will retry; this check is advisory
            log.warning("indexer.stream_info_failed", error=str(exc))
            return start_seq
        first = info.state.first_seq
        self.stream_last_seq = info.state.last_seq
        if first > start_seq and info.state.last_seq >= start_seq:
            for pool, st in self._states.items():
                if st.covered_seq + 1 < first:
                    st.history_lost = first - st.covered_seq - 1
                    m.HISTORY_LOST.labels(pool).inc()
                    log.error(
                        "indexer.history_lost", pool=pool, snapshot_seq=st.covered_seq, stream_first_seq=first,
                        missing=first - st.covered_seq - 1,
                        hint="the stream dropped events newer than the snapshot (max_age < snapshot cadence?); "
                        "rebuilding from the snapshot plus what the stream still holds",
                    )  # fmt: skip
        return first

    async def _snapshot_loop(self) -> None:
        if not self.snapshot_enabled:
            return
        while True:
            await asyncio.sleep(0.2)
            # Not while a worker's messages are re-read or looked up: the snapshot would say they
            # are covered.
            if not self._serving or self._busy_backfilling():
                continue
            now = time.monotonic()
            for st in self._states.values():
                if not st.events_since_snapshot or now < st.snapshot_retry_at:
                    continue
                due_events = self.snapshot_every > 0 and st.events_since_snapshot >= self.snapshot_every
                due_time = self.snapshot_interval > 0 and now - st.last_snapshot_attempt >= self.snapshot_interval
                if due_events or due_time:
                    try:
                        await self._write_snapshot(st)
                        st.snapshot_failures = 0
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - retried with backoff
                        st.snapshot_failures += 1
                        delay = min(SNAPSHOT_RETRY_MAX_S, 2.0 ** min(st.snapshot_failures, 10))
                        st.snapshot_retry_at = time.monotonic() + delay
                        m.SNAPSHOTS.labels(st.pool, "error").inc()
                        log.error(
                            "snapshot.failed", pool=st.pool, error=f"{type(exc).__name__}: {exc}"[:500],
                            consecutive_failures=st.snapshot_failures, retry_in_s=delay,
                        )  # fmt: skip

    def _busy_backfilling(self) -> bool:
        return bool(self._probes) or (self.follower is not None and self.follower.replaying)

    async def _write_snapshot(self, st: PoolState) -> None:
        assert self.rt is not None
        async with self._snapshot_lock:
            st.last_snapshot_attempt = time.monotonic()
            started = time.perf_counter()
            # The state and `seq` must describe the same instant: nothing changes the index while it
            # is serialised in pieces, and matches are answered between the pieces.
            if self.follower is not None:
                self.follower.pause()
            self._held_discovery = []
            try:
                seq = max(self.applied_seq, st.covered_seq)  # a pool restored ahead of the follower covers more
                pending = st.events_since_snapshot
                data = await snapshot.serialise_cooperatively(st.index, seq, {"admission": self.admission.to_state(st.pool)})
            finally:
                held, self._held_discovery = self._held_discovery, None
                for call in held:
                    call()
                if self.follower is not None:
                    self.follower.resume()
            encoded = time.perf_counter()
            names = self.rt.names
            await snapshot.upload(self.rt.js, names.snapshots_bucket, names.snapshot_object(st.pool), data)
            st.events_since_snapshot = max(0, st.events_since_snapshot - pending)
            st.snapshot_seq = seq
            st.snapshot_time = time.time()
            took = time.perf_counter() - started
            m.SNAPSHOT_SECONDS.labels(st.pool).observe(took)
            m.SNAPSHOT_BYTES.labels(st.pool).set(len(data))
            m.SNAPSHOTS.labels(st.pool, "ok").inc()
            log.info(
                "index.snapshot_written", pool=st.pool, seq=seq, bytes=len(data), blocks=st.index.blocks,
                encode_s=round(encoded - started, 4), total_s=round(took, 4),
            )  # fmt: skip

    # ---- lag ----------------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        assert self.rt is not None
        while True:
            try:
                info = await self.rt.js.stream_info(self.rt.names.kv_stream)
                self.stream_last_seq = info.state.last_seq
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - transient; the follower reports real trouble
                pass
            m.STREAM_LAST_SEQ.set(self.stream_last_seq)
            m.APPLIED_SEQ.set(self.applied_seq)
            m.CONSUMER_LAG.set(max(0, self.stream_last_seq - self.applied_seq))
            if self.follower is not None:
                m.CONSUMER_PENDING.set(self.follower.pending)
            await asyncio.sleep(self.lag_interval)


def tune_gc() -> None:
    """For a process holding an index (`kvr indexer`, or a scheduler / bridge with --embedded-indexer),
    called by its `main`, not by library code: the index allocates millions of long-lived nodes, and
    CPython's default gen-0 threshold (700) makes the cyclic collector re-scan them constantly
    (measured: apply of new blocks ~2x slower). Freed nodes do not need the collector (pruning breaks
    the parent↔child link)."""
    gc.set_threshold(50_000, 20, 100)


def make_app(cfg: SimpleNamespace) -> IndexerApp:
    return IndexerApp(cfg)
