"""An index replica: the pure fold (`core.IndexCore`) fed from KVR_KV and the process's discovery
watcher, plus its snapshots. The indexer service (`app.IndexerApp`) is one with endpoints; a
scheduler (and the one-process bridge) holds one of its own, answering overlaps in process.

Start order matters for determinism: snapshots are loaded first, then discovery catches up (so
removed workers are known before any tail event is applied), then the KV follower resumes at the
oldest covered sequence + 1. While a snapshot is serialised (in pieces, between which matches are
answered) nothing may change the index: the follower is paused and discovery changes queue, in
arrival order (a re-put must follow its delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nats.js.errors import NotFoundError

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import MSG_ID, kv_msg_epoch
from services.runtime.badinput import malformed
from services.runtime.follower import StreamFollower
from services.runtime.logs import get_logger
from services.runtime.service import Runtime
from services.runtime.tasks import cancel_and_wait
from services.runtime.workers import WorkerWatcher

from . import metrics as m
from . import snapshot
from .admission import Admission, CapPolicy
from .core import Carry, IndexCore, KvOutcome, PoolState
from .index import OverlapScores, PrefixIndex
from .settings import IndexerConfig

log = get_logger("kvr.indexer")
SNAPSHOT_RETRY_MAX_S = 60.0
_REFUSED = {"bad_subject": "kv.bad_subject", "malformed": "kv.malformed", "subject_mismatch": "kv.subject_mismatch"}


class IndexReplica:
    def __init__(self, cfg: IndexerConfig) -> None:
        self.cfg = cfg
        self.pools: list[str] = list(cfg.pool)
        self.snapshot_every = cfg.snapshot_every_events
        self.snapshot_interval = cfg.snapshot_interval_s
        self.restore = cfg.snapshot_restore
        self.batch = cfg.follower_batch
        self.follower_max_bytes = cfg.follower_max_bytes
        self.max_lag = cfg.max_ready_lag_s
        admission = Admission(
            self.pools,
            buffer_bytes=cfg.unknown_worker_buffer_bytes,
            max_tracked=cfg.unknown_workers_tracked,
            caps=CapPolicy(
                headroom=cfg.worker_blocks_headroom,
                lower_tier_factor=cfg.worker_lower_tier_blocks_factor,
                default_blocks=cfg.worker_default_max_blocks,
            ),
        )
        self.core = IndexCore(self.pools, admission, default_block_size=cfg.block_size, report=self._report)
        self._match_seconds = {p: m.MATCH_SECONDS.labels(p) for p in self.pools}
        self._messages: dict[tuple[str, str], Any] = {}
        self._probes: set[asyncio.Task[None]] = set()
        self.stream_last_seq = 0
        self.rt: Runtime | None = None
        self.follower: StreamFollower | None = None
        self.watcher: WorkerWatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_stream = "KVR_KV"
        self._snapshot_lock = asyncio.Lock()
        # While a snapshot is serialised in pieces the index must not change: the follower is paused
        # and discovery callbacks queue here, in arrival order.
        self._held_discovery: list[Callable[[], None]] | None = None
        self.caught_up = asyncio.Event()  # discovery and KV caught up once
        m.APPS.add(self)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        """Restore, then follow: this process's discovery watcher first, the KV stream once it is caught up."""
        self.rt = rt
        names = rt.names
        m.init_pools(self.pools)
        self.core.prefix = names.prefix
        self._kv_stream = names.kv_stream
        if self.restore:
            await self._restore_snapshots()
        self.watcher = rt.discovery()
        self.watcher.listen(self._on_worker_put, self._on_worker_remove, expire=True)
        start_seq = min(st.covered_seq for st in self.core.states.values()) + 1
        self.core.applied_seq = start_seq - 1
        first_seq = await self._check_history(start_seq)
        # The follower exists before discovery is replayed: admitting a worker may rewind it.
        self.follower = StreamFollower(
            rt.nc, names.kv_stream, [names.kv_filter(p) for p in self.pools], self._on_kv,
            start_seq=max(start_seq, first_seq), batch=self.batch, max_bytes=self.follower_max_bytes,
            max_lag_s=self.max_lag, name="indexer-kv", on_history_lost=self._on_history_lost,
        )
        self.watcher.start()
        self._tasks.append(asyncio.create_task(self._follow_after_discovery(), name="indexer-follow"))
        self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="indexer-snapshots"))
        log.info("indexer.replica_started", pools=self.pools, resume_seq=start_seq)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(list(self._probes))
        if self.follower is not None:
            await self.follower.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        # A clean stop leaves a fresh snapshot so the next start replays as little as possible.
        if self.rt is not None and self.snapshot_enabled and self.caught_up.is_set() and not self._busy_backfilling():
            for st in self.core.states.values():
                if st.events_since_snapshot:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._write_snapshot(st), 5)

    def ready(self) -> bool:
        """Caught up with discovery and KV (server's account), connected, not lagging."""
        return (
            self.caught_up.is_set()
            and self.follower is not None
            and self.follower.ready()
            and self.watcher is not None
            and self.watcher.ready()
        )

    async def _follow_after_discovery(self) -> None:
        assert self.watcher is not None and self.follower is not None
        await self.watcher.caught_up.wait()
        while self._probes:  # workers registered while we were down: look their early messages up first
            await asyncio.wait(list(self._probes))
        self.follower.start()
        await self.follower.caught_up.wait()
        self.caught_up.set()
        for pool, st in self.core.states.items():
            log.info("indexer.caught_up", pool=pool, applied_seq=self.applied_seq, blocks=st.index.blocks, nodes=st.index.nodes)

    # ---- what the index holds -----------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        return self.core.applied_seq

    @property
    def admission(self) -> Admission:
        return self.core.admission

    @property
    def snapshot_enabled(self) -> bool:
        return self.snapshot_every > 0 or self.snapshot_interval > 0

    def digest(self) -> dict[str, Any]:
        """Per pool, the digest of the index and its block count, at `applied_seq` (`GET /digest`).
        Replicas that applied the same stream prefix report the same digests. Costs one dump of
        every index: for comparing replicas (tests, benchmarks, an operator), not for probes."""
        pools = {pool: {"index": st.index.digest(), "blocks": st.index.tier_blocks()} for pool, st in self.pool_states().items()}
        return {"applied_seq": self.applied_seq, "pools": pools}

    def pool_states(self) -> dict[str, PoolState]:
        return self.core.states

    def index(self, pool: str) -> PrefixIndex:
        return self.core.state(pool).index

    def overlap_scores(self, pool: str, hashes: list[int], early_exit: bool = False) -> OverlapScores:
        """The index's answer for local block hashes, without the wire types (in-process callers)."""
        started = time.perf_counter()
        res = self.core.overlap_scores(pool, hashes, early_exit)
        self._match_seconds[pool].observe(time.perf_counter() - started)
        return res

    def pool_status(self, pool: str) -> dict[str, Any]:
        st, adm = self.core.state(pool), self.core.admission.pools[pool]
        idx = st.index
        return {
            "blocks": idx.tier_blocks(),
            "nodes": idx.nodes,
            "workers": len(idx.worker_keys()),
            "block_size": self.core.block_size(pool),
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

    # ---- KV events ----------------------------------------------------------------------------

    def _on_kv(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        epoch = kv_msg_epoch(headers.get(MSG_ID)) if headers else 0
        self.core.on_kv(seq, subject, data, codec.content_type_of(headers), epoch)

    def _report(self, out: KvOutcome) -> None:
        key = (out.pool, out.outcome)
        counter = self._messages.get(key)
        if counter is None:
            counter = self._messages[key] = m.MESSAGES.labels(*key)
        counter.inc()
        if out.over_capacity:
            m.DROPPED_EVENTS.labels(out.pool, "over_capacity").inc(out.over_capacity)
        event = _REFUSED.get(out.outcome)
        if event is not None:
            fields: dict[str, Any] = {"subject": out.error} if out.outcome == "bad_subject" else {"error": out.error}
            if out.outcome == "malformed":
                fields["size"] = out.size
            malformed(self._kv_stream, "schema" if out.outcome == "malformed" else out.outcome, event, pool=out.pool, seq=out.seq,
                      **fields)

    def _carry_out(self, pool: str, worker_id: int, carry: Carry) -> None:
        """Do the I/O an admission needs (see `IndexCore.worker_put`)."""
        if carry.rewind_from is not None:
            assert self.follower is not None
            m.BACKFILLS.labels(pool, "rewind").inc()
            log.info("indexer.worker_backfill", pool=pool, worker_id=worker_id, from_seq=carry.rewind_from,
                     up_to=self.applied_seq)
            self.follower.rewind(carry.rewind_from)
        if carry.probe_from is not None:
            m.BACKFILLS.labels(pool, "probe").inc()
            self._start_probe(pool, worker_id, carry.probe_from)

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
                msg = await self.rt.js.get_msg(self._kv_stream, seq=max(1, from_seq), subject=subject, next=True)
                found: int | None = msg.seq
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
        self._carry_out(pool, worker_id, self.core.probe_result(pool, worker_id, found))

    def _on_history_lost(self, from_seq: int, count: int) -> None:
        for pool, st in self.core.states.items():
            st.history_lost += count
            m.HISTORY_LOST.labels(pool).inc()
            log.error(
                "indexer.history_lost", pool=pool, missing_from=from_seq, missing=count,
                hint="KVR_KV dropped events before this replica applied them (max_bytes or max_age too small for its lag)",
            )

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
        st = self.core.states.get(record.pool)
        if st is None:
            return
        if st.block_size not in (None, record.block_size):
            log.warning("indexer.block_size_changed", pool=record.pool, old=st.block_size, new=record.block_size)
        self._carry_out(record.pool, record.worker_id, self.core.worker_put(record))

    def _on_worker_remove(self, pool: str, worker_id: int) -> None:
        if self._held_discovery is not None:
            self._held_discovery.append(partial(self._on_worker_remove, pool, worker_id))
            return
        if pool in self.core.states:
            dropped = self.core.worker_removed(pool, worker_id)
            log.info("indexer.worker_removed", pool=pool, worker_id=worker_id, blocks_dropped=dropped)

    # ---- snapshots ----------------------------------------------------------------------------

    async def _restore_snapshots(self) -> None:
        assert self.rt is not None
        names = self.rt.names
        for pool in self.core.states:
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
            )

    def restore_pool(self, pool: str, loaded: snapshot.LoadedSnapshot) -> None:
        """Take a pool's state from a snapshot (before discovery and the stream are followed)."""
        self.core.restore_pool(pool, loaded.index, loaded.stream_seq, loaded.admission)
        self.core.states[pool].snapshot_time = loaded.written_at or time.time()

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
            for pool, st in self.core.states.items():
                if st.covered_seq + 1 < first:
                    st.history_lost = first - st.covered_seq - 1
                    m.HISTORY_LOST.labels(pool).inc()
                    log.error(
                        "indexer.history_lost", pool=pool, snapshot_seq=st.covered_seq, stream_first_seq=first,
                        missing=first - st.covered_seq - 1,
                        hint="the stream dropped events newer than the snapshot (max_age < snapshot cadence?); "
                        "rebuilding from the snapshot plus what the stream still holds",
                    )
        return first

    async def _snapshot_loop(self) -> None:
        if not self.snapshot_enabled:
            return
        while True:
            await asyncio.sleep(0.2)
            # Not while a worker's messages are re-read or looked up: the snapshot would say they
            # are covered.
            if not self.caught_up.is_set() or self._busy_backfilling():
                continue
            now = time.monotonic()
            for st in self.core.states.values():
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
                        )

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
                extra = {"admission": self.core.admission.to_state(st.pool)}
                data = await snapshot.serialise_cooperatively(st.index, seq, extra)
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
            )
