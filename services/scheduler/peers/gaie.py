"""The GAIE / llm-d endpoint picker's default scheduling profile, and llm-d's precise variant.

**GAIE default profile** (`GaieDefault`). Sources read (kubernetes-sigs/gateway-api-inference-extension,
the reference EPP as last shipped there; llm-d-router continues it):
`pkg/epp/config/loader/defaults.go` (one profile: `queue-scorer` weight 2,
`kv-cache-utilization-scorer` weight 2, `prefix-cache-scorer` weight 3, `max-score-picker`),
`pkg/epp/scheduling/framework/plugins/prefixcachescorer/plugin.go` and `indexer.go` (the
approximate prefix-cache scorer), `.../queuescorer/queue.go`,
`.../kvcacheutilizationscorer/kvcache_utilization.go`, `.../picker/max_score_picker.go`.

- *Prefix-cache scorer* (approximate: no KV events). The prompt is cut into blocks and chain-hashed;
  only the first `maxPrefixBlocksToMatch` = 256 blocks count, a partial last block is dropped. After
  each pick the request's hashes are added to the chosen server's LRU (capacity
  `lruCapacityPerServer` = 31,250, or with `autoTune` — on by default — the server's
  `num_gpu_blocks`), plus a reverse map hash → servers; an entry evicted from a server's LRU leaves
  the map. Matching walks the hashes in order while *some* server holds the hash and counts, per
  server, the hashes it holds on the way. Score = that count / number of hashes.
- *Queue scorer*: min-max normalised waiting queue (`vllm:num_requests_waiting`), shorter better;
  all equal → 1. *KV-cache-utilization scorer*: 1 − `vllm:kv_cache_usage_perc`.
- *Max-score picker*: highest Σ weight × score; ties to a random one (endpoints are shuffled first).
- The load scorers read the engines' metrics as scraped by the EPP every
  `--refresh-metrics-interval` (50 ms): decisions between two scrapes see the same queue lengths.

Modelling choices: upstream hashes *characters* of the request body, `blockSize` 64 characters, and
with `autoTune` `block_size × 4` characters (4 characters per token), i.e. about one engine block.
Here the blocks are the engines' own token blocks (the request's block sequence hashes), so a hash
is exactly one engine block; the 256-block cap therefore covers 256 engine blocks. The LRU
capacity is the engines' block count (`autoTune`).

**llm-d precise prefix cache** (`LlmdPrecise`). Sources read (llm-d/llm-d-inference-scheduler, now
llm-d-router): `pkg/plugins/scorer/precise_prefix_cache.go` (score = the kv-cache indexer's
longest consecutive prefix of blocks per pod, from the engines' KV events) and
`pkg/plugins/scorer/utils.go` (`indexedScoresToNormalizedScoredPods`: min-max normalised over the
pods that matched at least one block, all equal → 1, pods that matched nothing → 0); the profile
of the llm-d guide `guides/precise-prefix-cache-aware/scheduler/precise-prefix-cache-aware.values.yaml`
(llm-d/llm-d): `precise-prefix-cache-scorer` weight 2, `kv-cache-utilization-scorer` 1,
`queue-scorer` 1, `max-score-picker`, block size 64. The KV events are the ones our index folds
(the same delay), so its overlaps are exactly llm-d's per-pod consecutive matches.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..candidates import Candidate
from ..load import Target
from ..selector import LoadSource, Overlaps, SelectionInput
from .base import PeerContext, kv_utilization_scores, max_score_pick, queue_scores, weighted_sum


@dataclass(frozen=True)
class GaieConfig:
    queue_weight: float = 2.0
    kv_utilization_weight: float = 2.0
    prefix_weight: float = 3.0
    max_prefix_blocks: int = 256
    lru_capacity_per_server: int = 31_250
    auto_tune: bool = True  # LRU capacity = the server's KV blocks


class ApproxPrefixIndex:
    """The prefix-cache scorer's indexer: one LRU of block hashes per server + hash → servers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lru: dict[Target, OrderedDict[int, None]] = {}
        self.servers: dict[int, set[Target]] = {}

    def add(self, target: Target, hashes: Sequence[int]) -> None:
        lru = self.lru.setdefault(target, OrderedDict())
        servers = self.servers
        for h in hashes:  # in prompt order, as upstream: a prefix is older than what follows it
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            servers.setdefault(h, set()).add(target)
            if len(lru) > self.capacity:
                old, _ = lru.popitem(last=False)
                holders = servers[old]
                holders.discard(target)
                if not holders:
                    del servers[old]

    def match(self, hashes: Sequence[int]) -> dict[Target, int]:
        """Per server, the hashes it holds among the leading run that some server holds."""
        res: dict[Target, int] = {}
        for h in hashes:
            holders = self.servers.get(h)
            if not holders:
                break
            for t in holders:
                res[t] = res.get(t, 0) + 1
        return res


class GaieDefault:
    name = "gaie_default"

    def __init__(self, ctx: PeerContext, config: GaieConfig | None = None) -> None:
        self.ctx = ctx
        self.cfg = cfg = config or GaieConfig()
        self.index = ApproxPrefixIndex(ctx.kv_blocks if cfg.auto_tune and ctx.kv_blocks > 0 else cfg.lru_capacity_per_server)

    def choose(
        self, pool: Sequence[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, rng: random.Random
    ) -> Candidate:
        cfg = self.cfg
        hashes = list(inp.hashes[: cfg.max_prefix_blocks])
        matched = self.index.match(hashes)
        total = len(hashes)
        prefix = {t: n / total for t, n in matched.items()} if total else {}
        metrics = self.ctx.metrics()
        scores = weighted_sum(pool, [
            (cfg.queue_weight, queue_scores(pool, metrics)),
            (cfg.kv_utilization_weight, kv_utilization_scores(pool, metrics)),
            (cfg.prefix_weight, prefix),
        ])
        chosen = max_score_pick(pool, scores, rng)
        self.index.add(chosen.target, hashes)  # PreRequest: the pick is recorded
        return chosen


@dataclass(frozen=True)
class LlmdPreciseConfig:
    prefix_weight: float = 2.0
    kv_utilization_weight: float = 1.0
    queue_weight: float = 1.0


def normalized_prefix_scores(device: dict[Target, int], pool: Sequence[Candidate]) -> dict[Target, float]:
    """llm-d's min-max normalisation over the pods that matched: (s − min) / (max − min); all equal → 1."""
    matched = {c.target: device[c.target] for c in pool if device.get(c.target, 0) > 0}
    if not matched:
        return {}
    lo, hi = min(matched.values()), max(matched.values())
    if hi == lo:
        return dict.fromkeys(matched, 1.0)
    return {t: (s - lo) / (hi - lo) for t, s in matched.items()}


class LlmdPrecise:
    name = "llmd_precise"

    def __init__(self, ctx: PeerContext, config: LlmdPreciseConfig | None = None) -> None:
        self.ctx = ctx
        self.cfg = config or LlmdPreciseConfig()

    def choose(
        self, pool: Sequence[Candidate], load: LoadSource, ov: Overlaps, inp: SelectionInput, rng: random.Random
    ) -> Candidate:
        cfg = self.cfg
        metrics = self.ctx.metrics()
        scores = weighted_sum(pool, [
            (cfg.prefix_weight, normalized_prefix_scores(ov.device, pool)),
            (cfg.kv_utilization_weight, kv_utilization_scores(pool, metrics)),
            (cfg.queue_weight, queue_scores(pool, metrics)),
        ])
        return max_score_pick(pool, scores, rng)
