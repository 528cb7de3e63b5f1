"""The peer routers' policies (services/scheduler/peers): each rule of the upstream policy, through
the selector's plug-in (the same filters and scoring as our own policies)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from services.scheduler.load import LoadTracker, Target
from services.scheduler.peers import EngineMetrics, PeerContext, make_peer
from services.scheduler.peers.gaie import ApproxPrefixIndex, GaieDefault, LlmdPrecise, normalized_prefix_scores
from services.scheduler.peers.sglang import ApproxTrees, CacheAwareConfig, SglangCacheAware
from services.scheduler.selector import Overlaps, SelectionInput, Selector

from .helpers import add, cands, record

BS = 16


def ctx(
    metrics: Mapping[Target, EngineMetrics] | None = None, now: list[float] | None = None, kv_blocks: int = 1000
) -> PeerContext:
    clock = now if now is not None else [0.0]
    return PeerContext(block_size=BS, kv_blocks=kv_blocks, metrics=lambda: dict(metrics or {}), clock=lambda: clock[0])


def inp(hashes: list[int], isl: int | None = None) -> SelectionInput:
    return SelectionInput(isl_tokens=isl if isl is not None else len(hashes) * BS, block_size=BS, hashes=hashes)


POOL = cands(*(record(w, block_size=BS, total_kv_blocks=1000) for w in (1, 2, 3)))


def pick(plugin, hashes: list[int], load: LoadTracker | None = None, ov: Overlaps | None = None, isl: int | None = None) -> int:
    sel = Selector(rng=random.Random(0), plugin=plugin)
    d = sel.select(POOL, load or LoadTracker(), ov or Overlaps(), inp(hashes, isl))
    return d.decode.candidate.worker_id


# --- SGLang cache_aware ---------------------------------------------------------------------------


def test_sglang_new_prefix_goes_to_smallest_tree_then_sticks() -> None:
    p = SglangCacheAware(ctx())
    assert pick(p, [1, 2, 3, 4]) == 1  # all trees empty: the first smallest
    assert pick(p, [9, 8, 7, 6]) == 2  # no match: worker 1's tree is larger now
    assert pick(p, [1, 2, 3, 4, 5]) == 1  # 4 of 5 blocks match worker 1 (> 0.3)
    assert pick(p, [9, 99, 98, 97]) == 3  # 1 of 4 matches worker 2 (0.25 ≤ 0.3): smallest tree


def test_sglang_imbalance_switches_to_shortest_queue() -> None:
    cfg = CacheAwareConfig(balance_abs_threshold=2, balance_rel_threshold=1.5)
    p = SglangCacheAware(ctx(), cfg)
    assert pick(p, [1, 2, 3]) == 1
    load = LoadTracker()
    for i in range(3):  # worker 1: 3 in flight, worker 2: 0, worker 3: 1 → max − min 3 > 2, 3 > 1.5 × 0
        load.add(add(f"a{i}", 1, [100 + i], bs=BS), 1_000)
    load.add(add("b", 3, [200], bs=BS), 1_000)
    assert pick(p, [1, 2, 3], load) == 2  # the cached worker is skipped
    assert p.trees.size((2, 0)) == 3  # and the prompt still went into the chosen worker's tree
    load.add(add("c", 2, [300], bs=BS), 1_000)  # max − min = 3 − 1 = 2, not > 2: balanced again
    assert pick(p, [1, 2, 3], load) in (1, 2)  # both hold the whole prompt now


def test_sglang_eviction_trims_leaves_first_on_its_period() -> None:
    now = [0.0]
    p = SglangCacheAware(ctx(now=now), CacheAwareConfig(eviction_interval_s=10, max_tree_size=4 * 4 * BS))  # 4 blocks
    p.trees.insert((1, 0), [1, 2, 3])
    p.trees.insert((1, 0), [1, 2, 4, 5])
    assert p.trees.size((1, 0)) == 5
    now[0] = 9_999.0
    p._evict_due()
    assert p.trees.size((1, 0)) == 5  # not yet
    now[0] = 10_000.0
    p._evict_due()
    assert p.trees.size((1, 0)) == 4
    assert p.trees.longest_match([1, 2, 3], frozenset({(1, 0)}))[0] == 2  # the old leaf 3 went first
    assert p.trees.longest_match([1, 2, 4, 5], frozenset({(1, 0)}))[0] == 4


def test_approx_trees_longest_match_over_tenants() -> None:
    t = ApproxTrees()
    t.insert((1, 0), [1, 2, 3])
    t.insert((2, 0), [1, 2])
    everyone = frozenset({(1, 0), (2, 0), (3, 0)})
    assert t.longest_match([1, 2, 3, 4], everyone) == (3, frozenset({(1, 0)}))
    assert t.longest_match([1, 2, 7], everyone) == (2, frozenset({(1, 0), (2, 0)}))
    assert t.longest_match([7], everyone) == (0, frozenset())


# --- GAIE default profile --------------------------------------------------------------------------


def test_gaie_index_lru_capacity_and_match_counting() -> None:
    idx = ApproxPrefixIndex(capacity=3)
    idx.add((1, 0), [1, 2, 3])
    idx.add((2, 0), [1, 2])
    assert idx.match([1, 2, 3, 4]) == {(1, 0): 3, (2, 0): 2}
    idx.add((1, 0), [7])  # over capacity: the least recent (1) leaves worker 1's LRU and the map
    assert idx.match([1, 2, 3]) == {(1, 0): 2, (2, 0): 2}  # hash 1 is only on worker 2, the walk goes on
    assert idx.match([2, 3]) == {(1, 0): 2, (2, 0): 1}  # counts per server while some server holds the block


def test_gaie_weights_prefix_against_queue_and_kv_usage() -> None:
    metrics = {(1, 0): EngineMetrics(0, 4, 0.5), (2, 0): EngineMetrics(0, 0, 0.0), (3, 0): EngineMetrics(0, 0, 0.0)}
    p = GaieDefault(ctx(metrics))
    p.index.add((1, 0), [1, 2, 3, 4])
    # worker 1: 2×1 (queue) + 2×0.5 (kv) + 3×1 (prefix) = 6 > workers 2, 3: 2 + 2 + 0 = 4
    assert pick(p, [1, 2, 3, 4]) == 1
    metrics[(1, 0)] = EngineMetrics(5, 4, 0.9)  # longest queue → 0; 2×0.1 + 3 = 3.2 < 4
    assert pick(p, [1, 2, 3, 4]) in (2, 3)


def test_gaie_prefix_cap_and_lru_size_from_autotune() -> None:
    p = GaieDefault(ctx(kv_blocks=321))
    assert p.index.capacity == 321
    pick(p, list(range(1, 400)))
    assert sum(len(lru) for lru in p.index.lru.values()) == 256  # only the first 256 blocks are hashed


def test_max_score_ties_are_random_but_seeded() -> None:
    picks = {pick(GaieDefault(ctx()), [1, 2]) for _ in range(3)}
    assert len(picks) == 1  # same seed, same pick
    sel = Selector(rng=random.Random(5), plugin=GaieDefault(ctx()))
    seen = {sel.select(POOL, LoadTracker(), Overlaps(), inp([i, i + 1])).decode.candidate.worker_id for i in range(0, 60, 2)}
    assert seen == {1, 2, 3}  # fresh prefixes, equal load: ties spread over every worker


# --- llm-d precise ----------------------------------------------------------------------------------


def test_llmd_normalisation() -> None:
    assert normalized_prefix_scores({(1, 0): 4, (2, 0): 2}, POOL) == {(1, 0): 1.0, (2, 0): 0.0}
    assert normalized_prefix_scores({(1, 0): 3}, POOL) == {(1, 0): 1.0}
    assert normalized_prefix_scores({(1, 0): 3, (2, 0): 3, (3, 0): 0}, POOL) == {(1, 0): 1.0, (2, 0): 1.0}
    assert normalized_prefix_scores({}, POOL) == {}


def test_llmd_precise_reads_the_index_overlaps() -> None:
    p = LlmdPrecise(ctx())
    assert pick(p, [1, 2, 3], ov=Overlaps(device={(3, 0): 2})) == 3
    busy = {(3, 0): EngineMetrics(9, 9, 0.95), (1, 0): EngineMetrics(0, 0, 0.0), (2, 0): EngineMetrics(0, 0, 0.0)}
    # 2×1 + 1×0.05 + 1×0 = 2.05 < 0 + 1 + 1 = 2? No: 2.05 > 2, the cache still wins ...
    assert pick(LlmdPrecise(ctx(busy)), [1, 2, 3], ov=Overlaps(device={(3, 0): 2})) == 3
    busy[(3, 0)] = EngineMetrics(9, 9, 1.0)  # ... until the KV cache is full: 2 = 2, a tie
    sel = Selector(rng=random.Random(1), plugin=LlmdPrecise(ctx(busy)))
    got = {sel.select(POOL, LoadTracker(), Overlaps(device={(3, 0): 2}), inp([1, 2, 3])).decode.candidate.worker_id
           for _ in range(20)}
    assert got == {1, 2, 3}


def test_make_peer_names() -> None:
    for name in ("sglang_cache_aware", "gaie_default", "llmd_precise"):
        assert make_peer(name, ctx()).name == name
    with pytest.raises(ValueError, match="unknown peer policy"):
        make_peer("nope", ctx())
