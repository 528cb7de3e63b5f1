"""The prefix index: a radix tree over local block hashes, folded from KV-cache events (docs/protocol.md §2).

Pure and deterministic: no I/O, no clocks. The same event sequence always gives the same tree, and
`dump()` / `to_snapshot()` (`treecodec.py`) are canonical, so replicas and restored processes can be compared.

Layout (chosen for speed and memory in CPython):
- A node is one *path* of local hashes from the root; `children` maps local hash → node and is
  allocated only when the node gets a child (most nodes are leaves).
- Membership is a bitmask over small per-(worker_id, dp_rank) *slots*: one int per node and tier,
  so `find_matches` narrows the active worker set with one `&` per block.
- Each (worker, dp_rank) keeps, per storage tier, `engine block hash → node`: parent lookups and
  removals are O(1), and the tree size of a worker is the length of its device map.
- A node lives as long as some worker holds it in some tier or it has children, so a worker that
  still holds a deep block whose middle ancestor was evicted keeps it (its leading prefix simply
  stops at the gap), and a re-stored ancestor reconnects it.
- Runs (path compression for reads): a stretch of ≥ `min_run` consecutive nodes with the same
  device mask, found by a match walking it, becomes a `_Run` hung on its first node: the keys of the
  rest, its last node and the shared mask (on the first node, not the one above it, so each branch
  below a fork gets its own). The next match through it compares a slice of the query with the
  keys (one C-level list comparison) and jumps, instead of one dict lookup and one `&` per block. A
  run is only a cache: any mask change of a member node invalidates it (one attribute check in the
  event path), nothing else can make it wrong (parents never change, and a node that still has a
  non-zero mask is still in the tree), and snapshots and dumps ignore it.
"""

from __future__ import annotations

import hashlib
import heapq
import sys
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, get_args

import msgspec

from schemas.events import RouterEvent, StorageTier, StoredBlock

TIERS: tuple[StorageTier, ...] = get_args(StorageTier)  # fastest first
EVENT_TYPES: tuple[str, ...] = ("stored", "removed", "cleared")
OUTCOMES: tuple[str, ...] = (
    "ok", "parent_not_found", "block_not_found", "duplicate", "gap", "invalid_block", "over_capacity", "other_domain",
)
DEVICE: StorageTier = "device"

WorkerKey = tuple[int, int]  # (worker_id, dp_rank)
_BITS = bytes.maketrans(b"01", b"\x00\x01")


@dataclass
class OverlapScores:
    scores: dict[WorkerKey, int] = field(default_factory=dict)
    tier_scores: dict[str, dict[WorkerKey, int]] = field(default_factory=dict)
    tree_sizes: dict[WorkerKey, int] = field(default_factory=dict)


class _Node:
    __slots__ = ("children", "mask", "parent", "key", "tiers", "alias", "run", "owner")

    def __init__(self, parent: _Node | None, key: int) -> None:
        self.children: dict[int, _Node] | None = None
        self.mask = 0  # device-tier membership, one bit per worker slot
        self.parent = parent
        self.key = key  # local (tokens) hash of this block
        self.tiers: dict[str, int] | None = None  # lower-tier membership masks
        # Extra references when one worker maps several engine hashes onto the same node of a tier;
        # the bit is cleared only when the last one goes.
        self.alias: dict[tuple[str, int], int] | None = None
        self.run: _Run | None = None  # a run of descendants with this node's mask, hung here
        self.owner: _Run | None = None  # the run this node is a member of (possibly invalidated)


class _Run:
    """Consecutive descendants of one node along `keys`, all with its device mask `mask` (module doc)."""

    __slots__ = ("keys", "end", "mask", "length", "valid")

    def __init__(self, keys: list[int], end: _Node) -> None:
        self.keys = keys
        self.end = end
        self.mask = end.mask
        self.length = len(keys)
        self.valid = True


# `_Node.run` of a node whose stretch one match has walked: never valid, it only says "build the run
# when a second match walks it".
_SEEN = _Run([], _Node(None, 0))
_SEEN.valid = False


class _Worker:
    __slots__ = ("key", "slot", "bit", "blocks")

    def __init__(self, key: WorkerKey, slot: int) -> None:
        self.key = key
        self.slot = slot
        self.bit = 1 << slot
        self.blocks: dict[StorageTier, dict[int, _Node]] = {DEVICE: {}}

    def resolve(self, block_hash: int, tier: StorageTier) -> _Node | None:
        """A parent reference: the event's own tier first, then device, then the slower tiers."""
        own = self.blocks.get(tier)
        if own is not None:
            node = own.get(block_hash)
            if node is not None:
                return node
        for t in TIERS:
            if t == tier:
                continue
            lk = self.blocks.get(t)
            if lk is not None:
                node = lk.get(block_hash)
                if node is not None:
                    return node
        return None

    def total(self) -> int:
        return sum(len(lk) for lk in self.blocks.values())


class PrefixIndex:
    def __init__(self, min_run: int = 4) -> None:
        # shortest equal-mask stretch worth a run: 2 at least (a run holds the keys after its first
        # node, and must advance a match), 4 by default (shorter ones save little)
        self.min_run = max(2, min_run)
        self.root = _Node(None, 0)
        self._workers: dict[WorkerKey, _Worker] = {}
        self._slot_keys: list[WorkerKey | None] = []
        self._free_slots: list[int] = []
        self.cursors: dict[WorkerKey, int] = {}
        self.epochs: dict[WorkerKey, int] = {}  # the publisher run each cursor counts in (absent = 0)
        self.restarts = 0  # publisher runs that started the ids over (new epoch, or a cleared going back)
        self.counters: dict[tuple[str, str], int] = {(t, o): 0 for t in EVENT_TYPES for o in OUTCOMES}
        self.gaps = 0  # events applied after a forward jump of the event id (also counted when the apply failed)
        self.nodes = 0  # live nodes, root excluded
        self.lower_tier_blocks = 0  # entries in host_pinned/disk/external; 0 keeps find_matches device-only
        self.version = 0  # bumped by every change; caches derived from the tree compare against it
        self._sizes: dict[WorkerKey, int] = {}
        self._sizes_version = 0
        # membership mask → its worker keys, as a dict so `dict.fromkeys` reuses the stored hashes
        # instead of hashing every (worker, dp_rank) tuple again; the same few masks (e.g. "every
        # worker holds the shared system prompt") come up in almost every match
        self._mask_keys: dict[int, dict[WorkerKey, None]] = {}
        self._first_scores: dict[tuple[int, int], dict[WorkerKey, int]] = {}  # (mask, depth) → scores

    # ---- events -----------------------------------------------------------------------------

    def apply(self, event: RouterEvent, cap: int | None = None, epoch: int = 0) -> str:
        """Fold one event. `cap`: the most blocks this (worker, dp rank) may hold in the event's tier;
        a store that would go over is refused whole (`over_capacity`). `epoch`: the publisher run
        its message names (`Nats-Msg-Id`, 0 = none): a new one starts the event ids over."""
        ev = event.event
        key = (event.worker_id, ev.dp_rank)
        data = ev.data
        if isinstance(data, str):
            kind = "cleared"
        elif data.stored is not None:
            kind = "stored"
        else:
            kind = "removed"
        eid = ev.event_id
        self.version += 1
        last = self.cursors.get(key)
        if epoch != self.epochs.get(key, 0):
            # A new publisher run (docs/protocol.md §2): its ids start over, whatever the old cursor.
            if epoch:
                self.epochs[key] = epoch
            else:
                del self.epochs[key]
            if last is not None:
                self.restarts += 1
            last = None
        gap = False
        if last is not None:
            if eid <= last:
                if kind != "cleared":
                    self.counters[(kind, "duplicate")] += 1
                    return "duplicate"
                # A publisher without epochs that restarted: its first event clears, ids from 1 again.
                self.restarts += 1
            else:
                gap = eid != last + 1
        self.cursors[key] = eid
        if not event.worker_domain:
            # Not the worker's own cache (Dynamo's `cache_owner` residency): never applied as the
            # worker's, a `cleared` included; its id still moves the publisher's cursor.
            self.counters[(kind, "other_domain")] += 1
            return "other_domain"
        if kind == "stored":
            if cap is not None and self._over_cap(key, event.storage_tier, data.stored.blocks, cap):  # type: ignore[union-attr]
                outcome = "over_capacity"
            else:
                outcome = self._store(key, event.storage_tier, data.stored)  # type: ignore[union-attr]
        elif kind == "removed":
            outcome = self._remove(key, event.storage_tier, data.removed.block_hashes)  # type: ignore[union-attr]
        else:
            self._clear(key)
            outcome = "ok"
        if gap:
            self.gaps += 1
            if outcome == "ok":
                outcome = "gap"
        self.counters[(kind, outcome)] += 1
        return outcome

    def apply_all(self, events: Iterable[RouterEvent]) -> None:
        for event in events:
            self.apply(event)

    def _worker(self, key: WorkerKey) -> _Worker:
        w = self._workers.get(key)
        if w is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)  # lowest free slot keeps masks short
                self._slot_keys[slot] = key
                self._mask_keys.clear()  # a reused slot now names another worker
                self._first_scores.clear()
            else:
                slot = len(self._slot_keys)
                self._slot_keys.append(key)
            w = self._workers[key] = _Worker(key, slot)
        return w

    def _release_if_empty(self, w: _Worker) -> None:
        if w.total() == 0:
            del self._workers[w.key]
            self._slot_keys[w.slot] = None
            heapq.heappush(self._free_slots, w.slot)

    def _store(self, key: WorkerKey, tier: StorageTier, stored: Any) -> str:
        blocks: list[StoredBlock] = stored.blocks
        parent_hash = stored.parent_hash
        prev = parent_hash
        for b in blocks:
            if b.block_hash == prev:  # a block cannot be its own parent (Dynamo: InvalidBlockSequence)
                return "invalid_block"
            prev = b.block_hash
        parent: _Node | None = self.root
        if parent_hash is not None:
            existing = self._workers.get(key)
            parent = existing.resolve(parent_hash, tier) if existing is not None else None
        if parent is None:
            return "parent_not_found"
        w = self._worker(key)
        lk = w.blocks.get(tier)
        if lk is None:
            lk = w.blocks[tier] = {}
        bit = w.bit
        device = tier == DEVICE
        created = 0
        lk_get = lk.get
        node: _Node | None
        for b in blocks:
            t = b.tokens_hash
            ch = parent.children
            if ch is None:
                node = _Node(parent, t)
                parent.children = {t: node}
                created += 1
            else:
                node = ch.get(t)
                if node is None:
                    node = ch[t] = _Node(parent, t)
                    created += 1
            e = b.block_hash
            old = lk_get(e)
            if old is not node:
                lk[e] = node
                if device:
                    m = node.mask
                    if m & bit:
                        self._add_alias(node, tier, w.slot)
                    else:
                        node.mask = m | bit
                        run = node.owner
                        if run is not None:
                            run.valid = False
                            node.owner = None
                else:
                    self._link_lower(node, tier, w)
                # Unlink the old position only after linking the new one: the old node may be a
                # descendant of `node`, and pruning it must not take `node` along.
                if old is not None:
                    self._unlink(old, tier, w)
                elif not device:
                    self.lower_tier_blocks += 1
            parent = node
        self.nodes += created
        return "ok"

    def _over_cap(self, key: WorkerKey, tier: StorageTier, blocks: list[StoredBlock], cap: int) -> bool:
        w = self._workers.get(key)
        lk = w.blocks.get(tier) if w is not None else None
        held = len(lk) if lk else 0
        if held + len(blocks) <= cap:
            return False  # the common case: no need to look at the hashes
        new = {b.block_hash for b in blocks}
        if lk:
            new.difference_update(lk.keys())
        return held + len(new) > cap

    def _add_alias(self, node: _Node, tier: StorageTier, slot: int) -> None:
        if node.alias is None:
            node.alias = {}
        k = (tier, slot)
        node.alias[k] = node.alias.get(k, 0) + 1

    def _link_lower(self, node: _Node, tier: StorageTier, w: _Worker) -> None:
        if node.tiers is None:
            node.tiers = {}
        m = node.tiers.get(tier, 0)
        if m & w.bit:
            self._add_alias(node, tier, w.slot)
        else:
            node.tiers[tier] = m | w.bit

    def _unlink(self, node: _Node, tier: StorageTier, w: _Worker) -> None:
        """Drop one reference of worker `w` to `node` in `tier`; prune nodes nobody needs."""
        alias = node.alias
        if alias is not None:
            k = (tier, w.slot)
            n = alias.get(k)
            if n:
                if n == 1:
                    del alias[k]
                    if not alias:
                        node.alias = None
                else:
                    alias[k] = n - 1
                return
        if tier == DEVICE:
            node.mask &= ~w.bit
            run = node.owner
            if run is not None:
                run.valid = False
                node.owner = None
        else:
            tiers = node.tiers
            m = tiers[tier] & ~w.bit  # type: ignore[index]
            if m:
                tiers[tier] = m  # type: ignore[index]
            else:
                del tiers[tier]  # type: ignore[union-attr]
                if not tiers:
                    node.tiers = None
        root = self.root
        while node is not root and not node.mask and node.tiers is None and not node.children:
            parent = node.parent
            assert parent is not None and parent.children is not None  # a node other than the root
            del parent.children[node.key]
            if not parent.children:
                parent.children = None
            self.nodes -= 1
            node = parent

    def _remove(self, key: WorkerKey, tier: StorageTier, hashes: Sequence[int]) -> str:
        w = self._workers.get(key)
        lk = w.blocks.get(tier) if w is not None else None
        if lk is None:
            return "block_not_found"
        outcome = "ok"
        device = tier == DEVICE
        for e in hashes:
            node = lk.pop(e, None)
            if node is None:
                outcome = "block_not_found"
                continue
            if not device:
                self.lower_tier_blocks -= 1
            self._unlink(node, tier, w)  # type: ignore[arg-type]
        self._release_if_empty(w)  # type: ignore[arg-type]
        return outcome

    def _clear(self, key: WorkerKey) -> int:
        """Drop every block of one (worker, dp_rank) in every tier; returns how many."""
        w = self._workers.get(key)
        if w is None:
            return 0
        dropped = 0
        for tier, lk in w.blocks.items():
            dropped += len(lk)
            if tier != DEVICE:
                self.lower_tier_blocks -= len(lk)
            for node in lk.values():
                self._unlink(node, tier, w)
            lk.clear()
        self._release_if_empty(w)
        return dropped

    def remove_worker(self, worker_id: int) -> int:
        """Discovery says the worker is gone: drop all its dp ranks, blocks and event-id cursors."""
        dropped = 0
        self.version += 1
        for key in [k for k in self._workers if k[0] == worker_id]:
            dropped += self._clear(key)
        for key in [k for k in self.cursors if k[0] == worker_id]:
            del self.cursors[key]
        for key in [k for k in self.epochs if k[0] == worker_id]:
            del self.epochs[key]
        return dropped

    # ---- queries ----------------------------------------------------------------------------

    def find_matches(self, local_hashes: Sequence[int], early_exit: bool = False) -> OverlapScores:
        """Leading-prefix block counts per (worker, dp_rank); `tree_sizes` is shared, do not mutate it.
        The walk down the tree (`_walk`) records where the set of matching workers narrows; the
        scores follow from those narrowings (`_scores`), the lower tiers' from a second walk."""
        sizes = self.tree_sizes()
        narrowings = self._walk(local_hashes, early_exit)
        if narrowings is None:
            return OverlapScores({}, {}, sizes)
        scores = self._scores(narrowings)
        out = OverlapScores(scores, {}, sizes)
        if self.lower_tier_blocks:
            out.tier_scores = self._tier_scores(local_hashes, scores)
        return out

    def _walk(self, local_hashes: Sequence[int], early_exit: bool) -> list[tuple[int, int]] | None:
        """(workers still matching before a narrowing, its depth), in walk order, the last set
        that still matches at the end included; None when the first block is in no worker's tree.
        Every worker's score is the depth of the last entry whose set holds it."""
        children = self.root.children
        node = children.get(local_hashes[0]) if children is not None and local_hashes else None
        if node is None:
            return None
        if type(local_hashes) is not list:
            local_hashes = list(local_hashes)  # run keys are compared as list slices
        active = node.mask
        pos = 1  # blocks matched so far = depth of `node`
        # Sets shrink along the walk, so the first one is the node's own mask (the same few for every
        # query) and later ones are small; recording the dropped workers instead would give a new
        # large mask for nearly every query
        narrowings: list[tuple[int, int]] = []
        # Early exit stops once one worker is left, as Dynamo's indexers do: that worker's score is
        # the depth of the block where it became the only one, that block included (a lower bound).
        last = 0
        if active and not (early_exit and not active & (active - 1)):
            n = len(local_hashes)
            min_run = self.min_run
            # the equal-mask stretch being walked block by block: `s_first` (depth `s_pos` + 1) down to `node`
            owned = node.owner is not None and node.owner.valid
            s_first, s_pos, s_mask = node, 0, -1 if owned else active
            while pos < n:
                run = node.run
                if run is not None and run.valid and local_hashes[pos : pos + run.length] == run.keys:
                    narrowed = active & run.mask
                    if narrowed != active:  # only if `node` gained workers since the stretch was walked
                        narrowings.append((active, pos))
                        active = narrowed
                        if not active:
                            break
                        if early_exit and not active & (active - 1):
                            last = pos + 1  # the one left holds the run's first block too
                            break
                    node = run.end
                    pos += run.length
                    s_pos, s_mask = pos, -1
                    continue
                children = node.children
                if children is None:
                    break
                child = children.get(local_hashes[pos])
                if child is None:
                    break
                m = child.mask
                narrowed = m & active
                if narrowed != active:
                    narrowings.append((active, pos))
                    active = narrowed
                    if not active:
                        break
                    if early_exit and not active & (active - 1):
                        last = pos + 1  # the one left holds `child` too
                        break
                owner = child.owner
                owned = owner is not None and owner.valid
                if m != s_mask or owned:
                    if pos - s_pos >= min_run:
                        self._add_run(s_first, node, local_hashes, s_pos + 1, pos)
                    s_first, s_pos, s_mask = child, pos, -1 if owned else m  # -1: a run's member starts no stretch
                node = child
                pos += 1
            if pos - s_pos >= min_run:
                self._add_run(s_first, node, local_hashes, s_pos + 1, pos)
        if active:
            narrowings.append((active, last or pos))
        return narrowings

    def _scores(self, narrowings: list[tuple[int, int]]) -> dict[WorkerKey, int]:
        """Each worker's depth: that of the last narrowing whose set holds it."""
        scores: dict[WorkerKey, int] = {}
        keys_of = self._mask_keys.get
        for bits, depth in narrowings:
            if not scores and bits.bit_count() >= 8:
                # A large first set and its depth repeat across queries (everyone holds the shared
                # system prompt): copying a built dict is a memcpy, building one hashes every key.
                first = self._first_scores.get((bits, depth))
                if first is None:
                    first = dict.fromkeys(keys_of(bits) or self._keys_of(bits), depth)
                    if len(self._first_scores) >= 1024:
                        self._first_scores.clear()
                    self._first_scores[(bits, depth)] = first
                scores = first.copy()
            else:
                scores.update(dict.fromkeys(keys_of(bits) or self._keys_of(bits), depth))
        return scores

    def _add_run(self, first: _Node, last: _Node, local_hashes: list[int], start: int, end: int) -> None:
        """Hang a run on `first`: the nodes below it along `local_hashes[start:end]`, down to `last`.
        The caller walked them: equal masks (`first`'s included), none a member of a valid run. The
        first walk only marks `first`; the second builds the run, so paths that are read once (most
        of a trace replay: match, then store onto the new path) do not pay for one."""
        if first.run is not _SEEN:
            first.run = _SEEN
            return
        run = _Run(local_hashes[start:end], last)
        node = last
        for _ in range(run.length):
            node.owner = run
            node = node.parent  # type: ignore[assignment]
        first.owner = run  # its mask is the run's too: a change must invalidate the run
        first.run = run

    def _keys_of(self, bits: int) -> dict[WorkerKey, None]:
        # bit i of `bits` selects slot i: the reversed binary digits, as bytes 0/1, drive a C-level
        # compress instead of a Python loop over up to 64 bits
        found = dict.fromkeys(compress(self._slot_keys, bin(bits)[:1:-1].encode().translate(_BITS)))
        if len(self._mask_keys) >= 16384:
            self._mask_keys.clear()
        self._mask_keys[bits] = found  # type: ignore[assignment]
        return found  # type: ignore[return-value]

    def _tier_scores(self, local_hashes: Sequence[int], device_scores: dict[WorkerKey, int]) -> dict[str, dict[WorkerKey, int]]:
        """Per lower tier: leading blocks held in this tier or a faster one, minus what faster tiers
        already cover (as Dynamo's selector counts them: lower tiers exclude blocks counted in faster tiers)."""
        result: dict[str, dict[WorkerKey, int]] = {}
        covered = dict(device_scores)
        for i in range(1, len(TIERS)):
            tiers = TIERS[1 : i + 1]
            cumulative = self._prefix_depths(local_hashes, tiers)
            beyond = {}
            for k, d in cumulative.items():
                extra = d - covered.get(k, 0)
                if extra > 0:
                    beyond[k] = extra
            if beyond:
                result[TIERS[i]] = beyond
            covered = cumulative
        return result

    def _prefix_depths(self, local_hashes: Sequence[int], lower: tuple[str, ...]) -> dict[WorkerKey, int]:
        depths: dict[WorkerKey, int] = {}
        children = self.root.children
        active = 0
        depth = 0
        for h in local_hashes:
            child = children.get(h) if children is not None else None
            if child is None:
                break
            m = child.mask
            if child.tiers is not None:
                for t in lower:
                    m |= child.tiers.get(t, 0)
            narrowed = active & m if depth else m
            dropped = active ^ narrowed if depth else 0
            while dropped:
                low = dropped & -dropped
                depths[self._slot_keys[low.bit_length() - 1]] = depth  # type: ignore[index]
                dropped ^= low
            active = narrowed
            if not active:
                break
            depth += 1
            children = child.children
        while active:
            low = active & -active
            depths[self._slot_keys[low.bit_length() - 1]] = depth  # type: ignore[index]
            active ^= low
        return depths

    def tree_sizes(self) -> dict[WorkerKey, int]:
        """Device blocks per (worker, dp_rank), for every worker holding any. Cached until the next
        change (`version`); the returned dict is shared, do not mutate it."""
        if self._sizes_version != self.version:
            self._sizes = {k: n for k, w in self._workers.items() if (n := len(w.blocks[DEVICE]))}
            self._sizes_version = self.version
        return self._sizes

    # ---- sizes ------------------------------------------------------------------------------

    def run_stats(self) -> tuple[int, int]:
        """(valid runs, bytes they hold): the read cache's footprint, for benchmarks and metrics."""
        runs = size = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            run = node.run
            if run is not None and run.valid:
                runs += 1
                size += sys.getsizeof(run) + sys.getsizeof(run.keys)
            if node.children:
                stack.extend(node.children.values())
        return runs, size

    @property
    def blocks(self) -> int:
        """(block, worker) entries over all tiers."""
        return sum(w.total() for w in self._workers.values())

    def worker_keys(self) -> list[WorkerKey]:
        return sorted(self._workers)

    def tier_blocks(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(TIERS, 0)
        for w in self._workers.values():
            for t, lk in w.blocks.items():
                out[t] += len(lk)
        return out

    # ---- events and snapshots (treecodec.py) -------------------------------------------------

    def digest(self) -> str:
        """SHA-256 of the msgpack encoding of `dump()`: equal for two indexes holding the same blocks
        (replicas that applied the same stream prefix), different otherwise."""
        return hashlib.sha256(msgspec.msgpack.encode(self.dump())).hexdigest()

    def dump(self) -> list[RouterEvent]:
        """Single-block stored events that rebuild this tree in an empty index (`treecodec.dump`)."""
        from .treecodec import dump

        return dump(self)

    def to_snapshot(self) -> dict[str, Any]:
        from .treecodec import to_snapshot

        return to_snapshot(self)

    def snapshot_steps(self, step: int = 10_000) -> Generator[None, None, dict[str, Any]]:
        from .treecodec import snapshot_steps

        return snapshot_steps(self, step)

    @classmethod
    def from_snapshot(cls, state: dict[str, Any]) -> PrefixIndex:
        from .treecodec import from_snapshot

        return from_snapshot(state)


__all__ = ["EVENT_TYPES", "OUTCOMES", "TIERS", "OverlapScores", "PrefixIndex"]
