"""The index replica's fold, pure: KVR_KV messages and discovery changes → one `PrefixIndex` per pool.

What reaches the index is decided by `admission.Admission` (subject binding, workers not in
discovery yet, per-worker caps); this class applies its answers: apply a message now, hold it,
ignore it (a removed worker, or already covered). A worker that is admitted may need I/O — its held
messages are applied here, but a re-read of the stream (*rewind*) or a look-up of its first
message (*probe*) is returned to the adapter (`replica.IndexReplica`), which carries it out and
hands the probe's answer back (`probe_result`).

Events of a worker whose discovery key is deleted are ignored until the worker is put again: KV
events and discovery live on different streams, so a replica may see a removed worker's last events
before or after the delete; dropping them after it makes every replica (running or restarted) end
with none of that worker's blocks, whatever the interleaving.

Deterministic, no I/O, no clock: every message's fate is reported to the `report` callback (the
adapter counts and logs it) as a `KvOutcome`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple

from msgspec import Meta

from schemas import codec
from schemas.api import ErrorCode, MatchReply, MatchRequest, WorkerScore, mm_objects
from schemas.codec import SchemaError
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from schemas.hashing import effective_salt, local_block_hashes, salt_seed
from schemas.types import MAX_EVENTS_PER_MESSAGE
from services.runtime.responder import ServiceError

from .admission import Admission, Admit, Held, Verdict, binding_error, parse_kv_subject
from .index import OverlapScores, PrefixIndex

KvPayload = RouterEvent | Annotated[list[RouterEvent], Meta(max_length=MAX_EVENTS_PER_MESSAGE)]
# Lower tiers a match reply always names (empty lists when nothing is held there); `external` only when present.
REPORTED_TIERS = ("host_pinned", "disk")


@dataclass
class PoolState:
    pool: str
    index: PrefixIndex = field(default_factory=PrefixIndex)
    covered_seq: int = 0  # messages up to here are already in the restored snapshot
    block_size: int | None = None  # from discovery; all workers of a pool share it
    events_since_snapshot: int = 0
    restored_seq: int = 0
    malformed: int = 0  # messages refused: undecodable, invalid, or not matching their subject
    history_lost: int = 0  # stream sequences missing between the snapshot and the stream's first message
    dropped: int = 0  # messages of removed workers, ignored
    sizes_cache: tuple[int, list[WorkerScore]] = (-1, [])  # (index version, tree_sizes as reply items)
    # Written by the adapter's snapshot writer (kept here: the metrics collector reads one object per pool).
    snapshot_time: float = 0.0  # wall time of the last snapshot written or loaded
    snapshot_seq: int = 0
    last_snapshot_attempt: float = 0.0
    snapshot_failures: int = 0  # consecutive failed snapshot writes (reset by a good one)
    snapshot_retry_at: float = 0.0  # monotonic time before which a failed snapshot is not retried


class KvOutcome(NamedTuple):
    """What became of one KV message (`outcome` is a label of `kvr_indexer_messages_total`)."""

    pool: str
    seq: int
    outcome: str  # ok, held, removed_worker, skipped_covered, skipped_replayed, bad_subject, malformed, subject_mismatch
    error: str | None = None  # why it was refused
    size: int = 0
    over_capacity: int = 0  # stored events refused by the worker's cap


@dataclass(frozen=True)
class Carry:
    """I/O an admission needs: re-read the stream from `rewind_from`, or look up the worker's first
    message at or after `probe_from` and call `IndexCore.probe_result`."""

    rewind_from: int | None = None
    probe_from: int | None = None


def _scores(d: dict[tuple[int, int], int]) -> list[WorkerScore]:
    return [WorkerScore(worker_id=k[0], dp_rank=k[1], blocks=v) for k, v in sorted(d.items())]


class IndexCore:
    def __init__(
        self,
        pools: Sequence[str],
        admission: Admission,
        *,
        prefix: str = "kvr",
        default_block_size: int = 16,
        report: Callable[[KvOutcome], None] | None = None,
    ) -> None:
        self.pools = list(pools)
        self.states = {p: PoolState(p) for p in self.pools}
        self.admission = admission
        self.prefix = prefix
        self.default_block_size = default_block_size
        self.report: Callable[[KvOutcome], None] = report or (lambda _: None)
        self.applied_seq = 0  # the highest stream sequence seen (applied, held or skipped)

    def state(self, pool: str) -> PoolState:
        st = self.states.get(pool)
        if st is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"pool {pool!r} is not served by this indexer")
        return st

    def block_size(self, pool: str) -> int:
        return self.state(pool).block_size or self.default_block_size

    # --- KV messages ---------------------------------------------------------------------------

    def on_kv(self, seq: int, subject: str, data: bytes, ctype: str | None, epoch: int = 0) -> None:
        """One message of KVR_KV, in stream order (or re-read by a rewind); `epoch`: the publisher
        run its `Nats-Msg-Id` names (`schemas.events.kv_msg_epoch`)."""
        if seq > self.applied_seq:
            self.applied_seq = seq
        parsed = parse_kv_subject(subject, self.prefix)
        if parsed is None:
            pool = subject[len(self.prefix) + 1 :].split(".", 1)[0] if subject.startswith(self.prefix + ".") else None
            st = self.states.get(pool) if pool is not None else None
            if st is not None:
                st.malformed += 1
                self.report(KvOutcome(st.pool, seq, "bad_subject", subject[:200]))
            return
        pool, worker_id, dp_rank = parsed
        st = self.states.get(pool)
        if st is None:
            return
        verdict = self.admission.route(pool, seq, worker_id)
        if verdict is Verdict.APPLY:
            self._apply_message(st, seq, worker_id, dp_rank, data, ctype, epoch)
        elif verdict is Verdict.HOLD:
            self.admission.hold(pool, Held(seq, worker_id, dp_rank, bytes(data), ctype, epoch))
            self.report(KvOutcome(pool, seq, "held"))
        elif verdict is Verdict.REMOVED:
            st.dropped += 1
            self.report(KvOutcome(pool, seq, "removed_worker"))
        else:
            self.report(KvOutcome(pool, seq, "skipped_covered" if seq <= st.covered_seq else "skipped_replayed"))

    def _apply_message(
        self, st: PoolState, seq: int, worker_id: int, dp_rank: int, data: bytes, ctype: str | None, epoch: int = 0
    ) -> None:
        pool = st.pool
        try:
            payload: RouterEvent | list[RouterEvent] = codec.decode(data, KvPayload, ctype)
        except SchemaError as exc:
            st.malformed += 1
            self.report(KvOutcome(pool, seq, "malformed", str(exc)[:300], len(data)))
            return
        events = payload if isinstance(payload, list) else (payload,)
        wrong = binding_error(events, worker_id, dp_rank)
        if wrong is not None:
            st.malformed += 1
            self.report(KvOutcome(pool, seq, "subject_mismatch", wrong, len(data)))
            return
        index = st.index
        cap = self.admission.cap
        over = 0
        for ev in events:
            if index.apply(ev, cap(pool, worker_id, ev.storage_tier), epoch) == "over_capacity":
                over += 1
        st.events_since_snapshot += len(events)
        self.report(KvOutcome(pool, seq, "ok", over_capacity=over))

    # --- discovery -----------------------------------------------------------------------------

    def worker_put(self, record: WorkerRecord) -> Carry:
        """A discovery put (new worker, heartbeat or update); returns the I/O its admission needs."""
        st = self.states.get(record.pool)
        if st is None:
            return Carry()
        st.block_size = record.block_size
        admit = self.admission.put(record.pool, record.worker_id, record.total_kv_blocks)
        return self._carry_out(record.pool, record.worker_id, admit)

    def worker_removed(self, pool: str, worker_id: int) -> int:
        """Discovery deleted the worker (or a delete marker was replayed): drop its blocks, ignore
        its messages until it is put again. Returns the blocks dropped."""
        st = self.states.get(pool)
        if st is None:
            return 0
        self.admission.remove(pool, worker_id)
        dropped = st.index.remove_worker(worker_id)
        st.events_since_snapshot += 1
        return dropped

    def probe_result(self, pool: str, worker_id: int, found: int | None) -> Carry:
        """The adapter's answer to `Carry.probe_from`: the worker's first message at or after it."""
        return self._carry_out(pool, worker_id, self.admission.probe_result(pool, worker_id, found))

    def _carry_out(self, pool: str, worker_id: int, admit: Admit) -> Carry:
        st = self.states[pool]
        for held in admit.apply:
            self._apply_message(st, held.seq, held.worker_id, held.dp_rank, held.data, held.content_type, held.epoch)
        if admit.rewind_from is not None:
            # Everything up to where the follower is was processed: re-read only this worker's.
            self.admission.begin_replay(pool, worker_id, admit.rewind_from, self.applied_seq)
        return Carry(admit.rewind_from, admit.probe_from)

    # --- snapshots -----------------------------------------------------------------------------

    def restore_pool(self, pool: str, index: PrefixIndex, stream_seq: int, admission: dict[str, Any] | None) -> None:
        """Take a pool's state from a snapshot (before discovery and the stream are followed)."""
        st = self.states[pool]
        st.index = index
        st.sizes_cache = (-1, [])
        st.covered_seq = st.restored_seq = st.snapshot_seq = stream_seq
        self.admission.restore(pool, admission, covered=stream_seq)

    # --- queries -------------------------------------------------------------------------------

    def overlap_scores(self, pool: str, hashes: list[int], early_exit: bool = False) -> OverlapScores:
        return self.state(pool).index.find_matches(hashes, early_exit)

    def hashes_of(self, pool: str, req: MatchRequest) -> list[int]:
        """The local block hashes a match request asks about."""
        if req.block_hashes is not None:
            return req.block_hashes
        seed = salt_seed(req.lora_name, effective_salt(req.cache_salt, req.cache_namespace))
        return local_block_hashes(req.token_ids or [], self.block_size(pool), seed, mm_objects(req.multimodal))

    def match_reply(self, pool: str, res: OverlapScores) -> MatchReply:
        """`indexer.match`'s answer (docs/protocol.md §5) from the index's scores."""
        st = self.state(pool)
        if res.tier_scores:
            tiers = {t: _scores(res.tier_scores.get(t, {})) for t in REPORTED_TIERS}
            if "external" in res.tier_scores:
                tiers["external"] = _scores(res.tier_scores["external"])
        else:
            tiers = {t: [] for t in REPORTED_TIERS}
        index = st.index
        version, sizes = st.sizes_cache
        if version != index.version:  # tree sizes change only with events, not per request
            sizes = _scores(res.tree_sizes)
            st.sizes_cache = (index.version, sizes)
        return MatchReply(
            block_size=st.block_size or self.default_block_size, scores=_scores(res.scores), tier_scores=tiers, tree_sizes=sizes,
            stream_seq=self.applied_seq,
        )
