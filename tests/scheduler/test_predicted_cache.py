"""Approximate mode's predicted cache (pure): leading-block overlap, TTL refresh, size cap, removal."""

from __future__ import annotations

from services.scheduler.predicted import PredictedCache


def scores(reply):
    return {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}


def test_leading_block_overlap_per_target():
    c = PredictedCache(ttl_ms=1_000, max_blocks=100)
    c.record("p", (1, 0), [1, 2, 3, 4], now_ms=0)
    c.record("p", (2, 0), [1, 2, 9], now_ms=0)
    assert scores(c.match_seq("p", [1, 2, 3, 7], 10)) == {(1, 0): 3, (2, 0): 2}
    assert scores(c.match_seq("p", [5, 1, 2], 10)) == {}  # overlap is about *leading* blocks
    assert scores(c.match_seq("other", [1, 2], 10)) == {}
    assert {(s.worker_id, s.blocks) for s in c.match_seq("p", [1], 10).tree_sizes} == {(1, 4), (2, 3)}


def test_ttl_expiry_and_refresh():
    c = PredictedCache(ttl_ms=1_000, max_blocks=100)
    c.record("p", (1, 0), [1, 2, 3], now_ms=0)
    c.record("p", (1, 0), [1, 2], now_ms=600)  # refreshes the prefix only
    assert scores(c.match_seq("p", [1, 2, 3], 999)) == {(1, 0): 3}
    assert scores(c.match_seq("p", [1, 2, 3], 1_000)) == {(1, 0): 2}  # block 3 is past its TTL
    assert c.expire(1_000) == 1 and c.size() == 2
    assert c.expire(1_600) == 2 and c.size() == 0


def test_size_cap_prunes_oldest_to_eighty_percent():
    c = PredictedCache(ttl_ms=10_000, max_blocks=10)
    c.record("p", (1, 0), list(range(1, 9)), now_ms=0)
    c.record("p", (2, 0), [100, 101, 102], now_ms=1)  # 11 > 10 → prune to 8
    assert c.size() == 8 and c.pruned == 1
    assert scores(c.match_seq("p", [100, 101, 102], 2)) == {(2, 0): 3}
    assert scores(c.match_seq("p", [1, 2], 2)) == {}  # oldest entries went first
    assert scores(c.match_seq("p", [4, 5, 6], 2)) == {(1, 0): 3}


def test_drop_worker():
    c = PredictedCache()
    c.record("p", (1, 0), [1, 2], now_ms=0)
    c.record("p", (1, 1), [1, 2], now_ms=0)
    c.record("p", (2, 0), [1], now_ms=0)
    c.drop_worker("p", 1)
    assert scores(c.match_seq("p", [1, 2], 1)) == {(2, 0): 1} and c.size() == 1
