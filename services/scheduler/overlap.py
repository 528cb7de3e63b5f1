"""The overlap seam: where the scheduler gets "how many leading blocks does each worker hold".

Three sources implement `OverlapSource`, and the selector only ever sees the `Overlaps` tables
they produce, so the deployment shape does not leak into the decision:
- `NatsOverlap`: asks a separate indexer service over NATS (`kvr.{pool}.indexer.match`);
- `EmbeddedOverlap`: an `IndexerApp` running in this process (one-process deployment);
- `PredictedCache`: approximate mode (no KV events, as Dynamo's approximate mode): the scheduler's own decisions,
  each remembered for a TTL, in a size-capped table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Protocol

from nats.aio.client import Client as NATS

from schemas.api import MatchReply, MatchRequest, WorkerScore
from schemas.hashing import sequence_hashes
from schemas.subjects import Names
from services.runtime.responder import request

from .selector import Overlaps

Target = tuple[int, int]


class OverlapSource(Protocol):
    async def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        """What the selector uses: `match` as per-target tables (the embedded index skips the wire types)."""
        ...

    def ready(self) -> bool: ...

    async def stop(self) -> None: ...


class _ReplyOverlap:
    """Sources whose answer is a `MatchReply` (over NATS, or the predicted cache), turned into the
    selector's tables by `overlaps`; always ready."""

    async def match(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int] | None = None) -> MatchReply:
        raise NotImplementedError

    async def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        return Overlaps.from_match(await self.match(pool, local_hashes, seq_hashes))

    def ready(self) -> bool:
        return True

    async def stop(self) -> None:
        return None


class NatsOverlap(_ReplyOverlap):
    def __init__(self, nc: NATS, names: Names, timeout_s: float = 1.0) -> None:
        self.nc = nc
        self.names = names
        self.timeout_s = timeout_s

    async def match(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int] | None = None) -> MatchReply:
        return await request(
            self.nc, self.names.match(pool), MatchRequest(block_hashes=local_hashes), MatchReply, timeout=self.timeout_s, msgpack=True
        )


class EmbeddedOverlap:
    """The indexer inside this process: the same overlaps, read from the index without wire types
    or a network hop."""

    def __init__(self, cfg: SimpleNamespace) -> None:
        from services.indexer.app import IndexerApp  # only needed in the one-process deployment

        # No NATS endpoints of its own: a separate indexer fleet keeps answering indexer.match.
        self.app: Any = IndexerApp(cfg, serve_endpoints=False)

    async def start(self, rt: Any) -> None:
        await self.app.start(rt)

    async def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        return Overlaps.from_scores(self.app.overlap_scores(pool, local_hashes))

    def ready(self) -> bool:
        return bool(self.app.ready())

    async def stop(self) -> None:
        await self.app.stop()


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


class PredictedOverlap(_ReplyOverlap):
    """`OverlapSource` over a `PredictedCache` (the adapter records decisions into it)."""

    def __init__(self, cache: PredictedCache, clock_ms: Any) -> None:
        self.cache = cache
        self._clock_ms = clock_ms

    async def match(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int] | None = None) -> MatchReply:
        seq = list(seq_hashes) if seq_hashes is not None else sequence_hashes(local_hashes)
        return self.cache.match_seq(pool, seq, self._clock_ms())
