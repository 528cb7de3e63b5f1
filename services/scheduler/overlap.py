"""The overlap seam: where the scheduler gets "how many leading blocks does each worker hold".

The decision (`decide.Decider`) only ever sees the `Overlaps` tables these sources produce, so the
deployment shape does not leak into it. Two answer in this process, synchronously, so a select that
books nothing never suspends (`LocalOverlaps`):
- `EmbeddedOverlap`: the scheduler's own index replica (`services.indexer.replica.IndexReplica`: the
  indexer's pure fold plus its KV follower, on the process's shared discovery watcher) — the default;
- `PredictedOverlap`: approximate mode (no KV events), over the `predicted.PredictedCache`;
and one is awaited: `NatsOverlap` asks a separate indexer service (`kvr.{pool}.indexer.match`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from nats.aio.client import Client as NATS

from schemas.api import MatchReply, MatchRequest
from schemas.subjects import Names
from services.indexer.settings import IndexerConfig
from services.runtime.responder import request
from services.runtime.service import Runtime

from .predicted import PredictedCache
from .selector import Overlaps


class LocalOverlaps(Protocol):
    def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        """Per-target tables of the leading blocks held, for the request's hashes."""
        ...

    def ready(self) -> bool: ...

    async def stop(self) -> None: ...


class NatsOverlap:
    """The indexer service over NATS (`--embedded-indexer false`)."""

    def __init__(self, nc: NATS, names: Names, timeout_s: float = 1.0) -> None:
        self.nc = nc
        self.names = names
        self.timeout_s = timeout_s

    async def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        ask = MatchRequest(block_hashes=local_hashes)
        reply = await request(self.nc, self.names.match(pool), ask, MatchReply, timeout=self.timeout_s, msgpack=True)
        return Overlaps.from_match(reply)

    def ready(self) -> bool:
        return True

    async def stop(self) -> None:
        return None


class EmbeddedOverlap:
    """This process's own index replica: the same overlaps as the indexer service, read from the
    index without wire types or a network hop."""

    def __init__(self, cfg: IndexerConfig) -> None:
        from services.indexer.replica import IndexReplica  # the indexer's modules, only when embedded

        self.replica = IndexReplica(cfg)

    async def start(self, rt: Runtime) -> None:
        await self.replica.start(rt)

    def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        return Overlaps.from_scores(self.replica.overlap_scores(pool, local_hashes))

    def ready(self) -> bool:
        return self.replica.ready()

    async def stop(self) -> None:
        await self.replica.stop()


class PredictedOverlap:
    """Overlaps from a `PredictedCache` (the scheduler records its decisions into it)."""

    def __init__(self, cache: PredictedCache, clock_ms: Callable[[], int]) -> None:
        self.cache = cache
        self._clock_ms = clock_ms

    def overlaps(self, pool: str, local_hashes: list[int], seq_hashes: Sequence[int]) -> Overlaps:
        return Overlaps.from_match(self.cache.match_seq(pool, seq_hashes, self._clock_ms()))

    def ready(self) -> bool:
        return True

    async def stop(self) -> None:
        return None
