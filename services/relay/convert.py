"""Engine KV events → docs/protocol.md §2 RouterEvents for one worker (all its dp ranks). Pure, no I/O.

Rules (Dynamo's worker-side publisher, `lib/kv-router/src/publisher/`):

- `tokens_hash` of every *full* block is computed from the event's `token_ids` with the LoRA /
  cache-salt seed (docs/protocol.md §6); a store whose token count is not a multiple of the block size is
  cut at the last full block. Engine hashes become `block_hash` / `parent_hash`; `medium` becomes the
  storage tier.
- Stores without tokens (CPU offload / connector tiers) are resolved through the engine-hash →
  tokens_hash map learned from earlier stores (bounded LRU); the store is cut at the first block the
  map does not know.
- Holders per (dp rank, tier, block hash) = the set of KV-cache groups (`group_idx`) that hold the
  block. Hybrid models report a block once per group; vLLM's `kv_cache_report_mode="full"` re-reports
  cached blocks on every prefix hit but removes each (hash, group) once. So a store adds its group
  to the set (a repeated store in the same group is idempotent), a store whose blocks are *all*
  already held is suppressed, and a remove is forwarded only when the last group drops the block.
  A remove without a group (None) from a publisher that stored with groups drops every group. A
  remove of a never-seen hash is forwarded unchanged (the indexer counts and ignores it).
- Consecutive compatible events of one engine batch are merged (same rank and tier; stores only when
  the chain continues; removes always; `cleared` is a barrier), at most `max_batch_blocks` blocks per
  RouterEvent. Each RouterEvent then gets the next event id of its (worker, dp_rank).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from schemas.events import CLEARED, EventData, KvCacheEvent, RemoveData, RouterEvent, StoreData, StoredBlock
from schemas.hashing import SEED, local_block_hashes, salt_seed

from .decode import AllBlocksCleared, BadEvent, BlockRemoved, BlockStored, EngineEvent

# StorageTier::from_kv_medium (case-insensitive); missing → device.
_TIER_BY_MEDIUM = {
    "GPU": "device",
    "DEVICE": "device",
    "CPU": "host_pinned",
    "CPU_PINNED": "host_pinned",
    "CPU_TIER1": "host_pinned",
    "HOST": "host_pinned",
    "HOST_PINNED": "host_pinned",
    "CPU_TIER2": "disk",
    "DISK": "disk",
    "NVME": "disk",
    "STORAGE": "disk",
    "FS": "disk",
    "OBJ": "external",
    "EXTERNAL": "external",
    "NETWORK": "external",
    "REMOTE": "external",
    "SHARED": "external",
}


def storage_tier(medium: str | None) -> str | None:
    """Router storage tier of an engine `medium`; None for a medium we do not know."""
    if not medium:
        return "device"
    return _TIER_BY_MEDIUM.get(medium.upper())


_seed = lru_cache(maxsize=1024)(salt_seed)

NO_GROUP = -1  # the group of events without `group_idx` (vLLM before #37688, SGLang)


V = TypeVar("V")


class BoundedMap(OrderedDict[int, V]):
    """An LRU dict with a fixed capacity (oldest entry evicted first)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)

    def remember(self, key: int, value: V) -> None:
        if key in self:
            self.move_to_end(key)
        self[key] = value
        if len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class RankState:
    """What the relay must remember per dp rank."""

    tokens: BoundedMap[int]  # engine block hash → tokens_hash (any tier; tokens do not change)
    salts: BoundedMap[str]  # engine block hash → cache salt, for salted chains only
    # tier → engine hash → holding KV-cache group(s): one group as an int (the common case, and
    # compact), several as a set; group None is kept as NO_GROUP.
    held: dict[str, dict[int, int | set[int]]] = field(default_factory=dict)
    next_id: int = 1


@dataclass(slots=True)
class _Op:
    """A RouterEvent before batching and id assignment."""

    kind: str  # stored | removed | cleared
    tier: str
    parent: int | None = None
    blocks: list[tuple[int, int]] | None = None  # stored: (block_hash, tokens_hash)
    hashes: list[int] | None = None  # removed

    def size(self) -> int:
        if self.blocks is not None:
            return len(self.blocks)
        return len(self.hashes or ())


class Converter:
    def __init__(
        self,
        worker_id: int,
        block_size: int,
        *,
        max_batch_blocks: int = 128,
        hash_map_capacity: int = 262_144,
        salt_from_extra_keys: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.worker_id = worker_id
        self.block_size = block_size
        self.max_batch_blocks = max(1, max_batch_blocks)
        self.hash_map_capacity = hash_map_capacity
        self.salt_from_extra_keys = salt_from_extra_keys
        self.ranks: dict[int, RankState] = {}
        # Cumulative counters by name; the adapter turns them into Prometheus metrics.
        self.counts: Counter[str] = Counter()

    # -- state ---------------------------------------------------------------------------------

    def rank(self, dp_rank: int) -> RankState:
        state = self.ranks.get(dp_rank)
        if state is None:
            state = RankState(BoundedMap(self.hash_map_capacity), BoundedMap(self.hash_map_capacity))
            self.ranks[dp_rank] = state
        return state

    def set_next_id(self, dp_rank: int, next_id: int) -> None:
        """Continue ids from `next_id` (restored from the persisted high-water mark); never go back."""
        state = self.rank(dp_rank)
        state.next_id = max(state.next_id, next_id)

    def next_id(self, dp_rank: int) -> int:
        return self.rank(dp_rank).next_id

    def drain_counts(self) -> Counter[str]:
        out, self.counts = self.counts, Counter()
        return out

    # -- conversion ----------------------------------------------------------------------------

    def clear(self, dp_rank: int, tier: str = "device") -> list[RouterEvent]:
        """A `cleared` for one rank (engine restart, unrecoverable gap, dropped messages)."""
        self.rank(dp_rank).held.clear()
        return self._emit(dp_rank, [_Op("cleared", tier)])

    def convert(self, dp_rank: int, events: Iterable[EngineEvent]) -> list[RouterEvent]:
        """Convert one engine batch of one rank into batched, id-stamped RouterEvents."""
        state = self.rank(dp_rank)
        ops: list[_Op] = []
        for ev in events:
            self.counts["events_in"] += 1
            if isinstance(ev, BlockStored):
                op = self._stored(state, ev)
            elif isinstance(ev, BlockRemoved):
                op = self._removed(state, ev)
            elif isinstance(ev, AllBlocksCleared):
                tier = storage_tier(ev.medium) or "device"
                state.held.clear()
                op = _Op("cleared", tier)
            elif isinstance(ev, BadEvent):
                self.counts[f"invalid_{ev.reason}"] += 1
                op = None
            else:  # pragma: no cover - decode only produces the types above
                op = None
            if op is not None:
                ops.append(op)
        return self._emit(dp_rank, ops)

    def restamp(self, dp_rank: int, events: Iterable[RouterEvent]) -> list[RouterEvent]:
        """RouterEvents a Dynamo publisher made (`--source dynamo`: hashed, batched and de-duplicated
        on its side) as this worker's, with this rank's next ids: the relay's own `cleared`s and a
        restarted publisher's ids from 1 then stay in one increasing sequence per rank."""
        state = self.rank(dp_rank)
        out: list[RouterEvent] = []
        for ev in events:
            data = ev.event.data
            self.counts["events_in"] += 1
            if isinstance(data, str):
                state.held.clear()
                kind = "cleared"
            else:
                kind = "stored" if data.stored is not None else "removed"
                self.counts["blocks_out"] += len(data.stored.blocks) if data.stored is not None else len(data.removed.block_hashes)  # type: ignore[union-attr]
            self.counts[f"out_{kind}"] += 1
            out.append(RouterEvent(self.worker_id, KvCacheEvent(state.next_id, data, dp_rank), ev.storage_tier))
            state.next_id += 1
        return out

    def _tier(self, medium: str | None) -> str | None:
        tier = storage_tier(medium)
        if tier is None:
            self.counts["unknown_medium"] += 1
        return tier

    def _salt(self, state: RankState, ev: BlockStored) -> str | None:
        if ev.cache_salt:
            return ev.cache_salt
        if ev.parent_block_hash is not None:
            salt = state.salts.get(ev.parent_block_hash)
            return salt if isinstance(salt, str) else None
        # vLLM puts the cache salt in block 0's extra keys, after the LoRA name and multimodal keys.
        if self.salt_from_extra_keys and ev.extra_keys:
            first = ev.extra_keys[0]
            if isinstance(first, list):
                strings = [x for x in first if isinstance(x, str) and x != ev.lora_name]
                if strings:
                    return strings[-1]
        return None

    def _stored(self, state: RankState, ev: BlockStored) -> _Op | None:
        tier = self._tier(ev.medium)
        hashes = ev.block_hashes
        if tier is None or not hashes:
            return None
        pairs: list[tuple[int, int]]
        if ev.token_ids:
            if ev.block_size is not None and ev.block_size != self.block_size:
                self.counts["block_size_mismatch"] += 1
                return None
            salt = self._salt(state, ev)
            seed = _seed(ev.lora_name, salt) if (ev.lora_name or salt) else SEED
            n = min(len(hashes), len(ev.token_ids) // self.block_size)
            if n < len(hashes):
                self.counts["stores_cut"] += 1
            if n == 0:
                return None
            tokens = ev.token_ids if n * self.block_size == len(ev.token_ids) else ev.token_ids[: n * self.block_size]
            try:
                locals_ = local_block_hashes(tokens, self.block_size, seed)
            except (OverflowError, TypeError):
                self.counts["invalid_bad_event"] += 1
                return None
            pairs = list(zip(hashes, locals_, strict=False))  # a cut store: the hashes beyond its tokens wait
            remember = state.tokens.remember
            for bh, th in pairs:
                remember(bh, th)
            if salt:
                for bh, _ in pairs:
                    state.salts.remember(bh, salt)
        else:
            pairs = []
            known = state.tokens
            for bh in hashes:
                known_th = known.get(bh)
                if known_th is None:
                    break
                pairs.append((bh, known_th))
            if len(pairs) < len(hashes):
                self.counts["unresolved_stores"] += 1
            if not pairs:
                return None
        held = state.held.setdefault(tier, {})
        group = NO_GROUP if ev.group_idx is None else ev.group_idx
        already = True
        for bh, _ in pairs:
            holders = held.get(bh)
            if holders is None:
                held[bh] = group
                already = False
            elif isinstance(holders, set):
                holders.add(group)
            elif holders != group:
                held[bh] = {holders, group}
        if already:
            self.counts["dedup_stores"] += 1
            return None
        return _Op("stored", tier, parent=ev.parent_block_hash, blocks=pairs)

    def _removed(self, state: RankState, ev: BlockRemoved) -> _Op | None:
        tier = self._tier(ev.medium)
        if tier is None or not ev.block_hashes:
            return None
        held = state.held.setdefault(tier, {})
        group = NO_GROUP if ev.group_idx is None else ev.group_idx
        out: list[int] = []
        for bh in ev.block_hashes:
            holders = held.get(bh)
            if holders is None:
                out.append(bh)  # never seen: forward unchanged
            elif isinstance(holders, set):
                if group == NO_GROUP and NO_GROUP not in holders:
                    del held[bh]  # no group given: the block is gone from every group
                    out.append(bh)
                    continue
                holders.discard(group)
                if len(holders) == 1:
                    held[bh] = holders.pop()
            elif holders == group or group == NO_GROUP:
                del held[bh]
                out.append(bh)
            # else: another group still holds the block
        if len(out) < len(ev.block_hashes):
            self.counts["dedup_removes"] += len(ev.block_hashes) - len(out)
        if not out:
            return None
        return _Op("removed", tier, hashes=out)

    # -- batching and ids ----------------------------------------------------------------------

    def _batched(self, ops: list[_Op]) -> list[_Op]:
        cap = self.max_batch_blocks
        out: list[_Op] = []
        for op in ops:
            for piece in _split(op, cap):
                last = out[-1] if out else None
                if last is not None and last.tier == piece.tier and last.size() + piece.size() <= cap:
                    if last.kind == "stored" and piece.kind == "stored" and last.blocks and piece.parent == last.blocks[-1][0]:
                        last.blocks.extend(piece.blocks or ())
                        continue
                    if last.kind == "removed" and piece.kind == "removed" and last.hashes is not None:
                        last.hashes.extend(piece.hashes or ())
                        continue
                out.append(piece)
        return out

    def _emit(self, dp_rank: int, ops: list[_Op]) -> list[RouterEvent]:
        state = self.rank(dp_rank)
        out: list[RouterEvent] = []
        for op in self._batched(ops):
            event_id = state.next_id
            state.next_id += 1
            if op.kind == "stored":
                blocks = [StoredBlock(bh, th) for bh, th in op.blocks or ()]
                data: EventData | str = EventData(stored=StoreData(blocks=blocks, parent_hash=op.parent))
                self.counts["blocks_out"] += len(blocks)
            elif op.kind == "removed":
                data = EventData(removed=RemoveData(block_hashes=list(op.hashes or ())))
                self.counts["blocks_out"] += len(op.hashes or ())
            else:
                data = CLEARED
            self.counts[f"out_{op.kind}"] += 1
            out.append(RouterEvent(self.worker_id, KvCacheEvent(event_id, data, dp_rank), op.tier))  # type: ignore[arg-type]
        return out


def _split(op: _Op, cap: int) -> list[_Op]:
    """Cut an oversized op into chained pieces of at most `cap` blocks."""
    if op.size() <= cap:
        return [op]
    if op.blocks is not None:
        pieces = []
        parent = op.parent
        for i in range(0, len(op.blocks), cap):
            chunk = op.blocks[i : i + cap]
            pieces.append(_Op("stored", op.tier, parent=parent, blocks=chunk))
            parent = chunk[-1][0]
        return pieces
    hashes = op.hashes or []
    return [_Op("removed", op.tier, hashes=hashes[i : i + cap]) for i in range(0, len(hashes), cap)]
