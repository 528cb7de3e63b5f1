"""Approximate mode's predicted cache (pure): with no KV events from the workers (as Dynamo's
approximate mode), the scheduler predicts what each target holds from its own decisions, each
remembered for a TTL, in a size-capped table. `overlap.PredictedOverlap` answers overlaps from it;
the scheduler records every decision into it and drops removed workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from schemas.api import MatchReply, WorkerScore

Target = tuple[int, int]


class PredictedCache:
    """Approximate mode: predicted cached blocks per target, keyed by sequence hash.

    Every recorded block gets `now + ttl`; recording it again refreshes it. Entries live in one
    insertion-ordered table, and since every entry has the same TTL, oldest-first order is also
    expiry order: expiry and the size cap (prune to 80 % of the cap, like Dynamo's PruneManager)
    both pop from the front in O(1) per entry.
    """

    def __init__(self, ttl_ms: int = 120_000, max_blocks: int = 1 << 20, block_size: int = 16) -> None:
        self.ttl_ms = ttl_ms
        self.max_blocks = max_blocks
        self.block_size = block_size
        # pool → (seq_hash, target) → expiry; pool → seq_hash → {target: expiry}
        self._order: dict[str, OrderedDict[tuple[int, Target], int]] = {}
        self._blocks: dict[str, dict[int, dict[Target, int]]] = {}
        self._sizes: dict[str, dict[Target, int]] = {}
        self.pruned = 0
        self.expired = 0

    def record(self, pool: str, target: Target, seq_hashes: Sequence[int], now_ms: int) -> None:
        order = self._order.setdefault(pool, OrderedDict())
        blocks = self._blocks.setdefault(pool, {})
        sizes = self._sizes.setdefault(pool, {})
        expires = now_ms + self.ttl_ms
        for h in seq_hashes:
            key = (h, target)
            holders = blocks.setdefault(h, {})
            if target not in holders:
                sizes[target] = sizes.get(target, 0) + 1
            holders[target] = expires
            order[key] = expires
            order.move_to_end(key)
        if len(order) > self.max_blocks:
            self._drop_front(pool, len(order) - int(self.max_blocks * 0.8))
            self.pruned += 1

    def expire(self, now_ms: int) -> int:
        dropped = 0
        for pool, order in self._order.items():
            n = 0
            for expires in order.values():
                if expires > now_ms:
                    break
                n += 1
            if n:
                self._drop_front(pool, n)
                dropped += n
        self.expired += dropped
        return dropped

    def _drop_front(self, pool: str, n: int) -> None:
        order, blocks, sizes = self._order[pool], self._blocks[pool], self._sizes[pool]
        for _ in range(n):
            (h, target), _exp = order.popitem(last=False)
            holders = blocks[h]
            del holders[target]
            if not holders:
                del blocks[h]
            sizes[target] -= 1
            if not sizes[target]:
                del sizes[target]

    def drop_worker(self, pool: str, worker_id: int) -> None:
        order = self._order.get(pool)
        if not order:
            return
        victims = [key for key in order if key[1][0] == worker_id]
        blocks, sizes = self._blocks[pool], self._sizes[pool]
        for key in victims:
            del order[key]
            h, target = key
            del blocks[h][target]
            if not blocks[h]:
                del blocks[h]
            sizes.pop(target, None)

    def size(self, pool: str | None = None) -> int:
        if pool is not None:
            return len(self._order.get(pool, ()))
        return sum(len(o) for o in self._order.values())

    def match_seq(self, pool: str, seq_hashes: Sequence[int], now_ms: int | None = None) -> MatchReply:
        blocks = self._blocks.get(pool, {})
        depth: dict[Target, int] = {}
        alive: set[Target] | None = None
        for i, h in enumerate(seq_hashes):
            holders = blocks.get(h)
            if not holders:
                break
            here = {t for t, exp in holders.items() if now_ms is None or exp > now_ms}
            alive = here if alive is None else alive & here
            if not alive:
                break
            for t in alive:
                depth[t] = i + 1
        sizes = self._sizes.get(pool, {})
        return MatchReply(
            block_size=self.block_size,
            scores=[WorkerScore(worker_id=t[0], dp_rank=t[1], blocks=n) for t, n in sorted(depth.items())],
            tier_scores={},
            tree_sizes=[WorkerScore(worker_id=t[0], dp_rank=t[1], blocks=n) for t, n in sorted(sizes.items())],
            stream_seq=0,
        )
