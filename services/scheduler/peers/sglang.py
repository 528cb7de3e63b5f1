"""SGLang router `cache_aware` policy, reproduced from upstream.

Sources read (sgl-project/sglang, the Rust router): `sgl-router/src/policies/cache_aware.rs`
(the policy), `sgl-router/src/policies/tree.rs` (the approximate radix tree: prefix match, the
smallest tenant, LRU eviction by size), `sgl-router/src/policies/mod.rs` (`CacheAwareConfig`), and the
defaults a user gets from the launcher, `sgl-router/py_src/sglang_router/router_args.py`:
`cache_threshold` 0.3, `balance_abs_threshold` 64, `balance_rel_threshold` 1.5,
`eviction_interval_secs` 120, `max_tree_size` 2^26. (The Rust struct's own `Default` and older
releases had 0.5 / 32 / 1.0001 / 60 s / 2^24; the launcher's values are what a deployment runs.)

The rule, per request:

1. *Imbalanced?* With `load` = the router's own count of requests in flight per worker:
   `max − min > balance_abs_threshold` and `max > balance_rel_threshold × min` → the worker with
   the fewest requests in flight (shortest queue); the prompt is still inserted into its tree.
2. Otherwise the longest prefix match of the prompt over every worker's tree: if
   `matched / prompt length > cache_threshold`, that worker; else the worker with the smallest tree
   ("most available cache"). The prompt is inserted into the chosen worker's tree.
3. Every `eviction_interval_secs` each worker's tree is trimmed to `max_tree_size`, least recently
   used leaves first.

The trees are *approximate*: built from routed prompts only, never corrected by the engines (no KV
events), so they keep prefixes the engine has long evicted.

Modelling choices (where our simulator differs from an HTTP deployment):

- Upstream's HTTP mode matches characters; its gRPC mode matches page-aligned tokens (`TokenTree`).
  Here a tree holds the prompt's block sequence hashes at the engines' block size (page-aligned
  tokens): a match is whole blocks, and the match rate is matched tokens / prompt tokens.
- `max_tree_size` counts characters upstream; at GAIE's estimate of 4 characters per token, 2^26
  characters are 2^24 tokens, i.e. 2^24 / block_size blocks per worker.
- Among several workers holding the longest match upstream returns whichever the tree node lists
  first (hash-map order); here a seeded random one of them. Equal smallest trees go to the lower
  worker id (upstream: the first in its map).
- Time is the simulator's clock: the eviction thread's period is in simulated seconds.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..candidates import Candidate
from ..load import Target
from ..selector import LoadSource, Overlaps, SelectionInput
from .base import PeerContext

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 120.0
    max_tree_size: int = 2**26  # characters


class ApproxTrees:
    """Every worker's approximate tree over block sequence hashes: an LRU set per worker plus the
    owners of each hash. A prompt's blocks are touched from its last to its first, so a prefix is
    always at least as recent as anything below it and trimming the least recent entry removes a
    leaf first (upstream's leaf-first LRU eviction)."""

    def __init__(self) -> None:
        self.lru: dict[Target, OrderedDict[int, None]] = {}
        self.owners: dict[int, set[Target]] = {}

    def insert(self, target: Target, hashes: Sequence[int]) -> None:
        lru = self.lru.setdefault(target, OrderedDict())
        owners = self.owners
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                owners.setdefault(h, set()).add(target)

    def size(self, target: Target) -> int:
        lru = self.lru.get(target)
        return len(lru) if lru is not None else 0

    def longest_match(self, hashes: Sequence[int], targets: frozenset[Target]) -> tuple[int, frozenset[Target]]:
        """Leading blocks matched by the best of `targets`, and which of them match that far."""
        alive = targets
        matched = 0
        for h in hashes:
            owners = self.owners.get(h)
            if not owners:
                break
            nxt = alive & owners
            if not nxt:
                break
            alive = nxt
            matched += 1
        return matched, (alive if matched else frozenset())

    def trim(self, max_blocks: int) -> None:
        for target, lru in self.lru.items():
            while len(lru) > max_blocks:
                h, _ = lru.popitem(last=False)
                owners = self.owners[h]
                owners.discard(target)
                if not owners:
                    del self.owners[h]


class SglangCacheAware:
    name = "sglang_cache_aware"

    def __init__(self, ctx: PeerContext, config: CacheAwareConfig | None = None) -> None:
        self.ctx = ctx
        self.cfg = config or CacheAwareConfig()
        self.trees = ApproxTrees()
        self.max_blocks = max(1, self.cfg.max_tree_size // CHARS_PER_TOKEN // ctx.block_size)
        self._next_eviction_ms = self.cfg.eviction_interval_s * 1000.0

    def _evict_due(self) -> None:
        now = self.ctx.clock()
        if self.cfg.eviction_interval_s <= 0 or now < self._next_eviction_ms:
            return
        self.trees.trim(self.max_blocks)
        period = self.cfg.eviction_interval_s * 1000.0
        while self._next_eviction_ms <= now:
            self._next_eviction_ms += period

    def choose(
        self, pool: Sequence[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, rng: random.Random
    ) -> Candidate:
        self._evict_due()
        cfg = self.cfg
        loads = {c.target: load.view(c.target).active_requests for c in pool}
        hi, lo = max(loads.values()), min(loads.values())
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            chosen = min(pool, key=lambda c: (loads[c.target], c.target))
        else:
            matched, holders = self.trees.longest_match(inp.hashes, frozenset(loads))
            rate = matched * inp.block_size / inp.isl_tokens if inp.isl_tokens else 0.0
            if rate > cfg.cache_threshold:
                ordered = sorted(holders)
                target = ordered[0] if len(ordered) == 1 else ordered[rng.randrange(len(ordered))]
                chosen = next(c for c in pool if c.target == target)
            else:
                chosen = min(pool, key=lambda c: (self.trees.size(c.target), c.target))
        self.trees.insert(chosen.target, inp.hashes)
        return chosen
