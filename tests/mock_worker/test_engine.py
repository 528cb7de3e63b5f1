"""The simulated engine: pool accounting, timing model, scheduling, and KV events vs. the pool."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, sequence_hashes
from services.mock_worker.engine import BlockPool, Engine, EngineConfig, decode_ms, prefill_ms


class IndexReplica:
    """The router's view rebuilt from events only, applying docs/protocol.md §2 semantics strictly."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}
        self.tokens: dict[int, int] = {}
        self.last_event_id = -1

    def apply(self, ev: RouterEvent) -> None:
        assert ev.event.event_id == self.last_event_id + 1, "event ids must be dense and ordered"
        self.last_event_id = ev.event.event_id
        data = ev.event.data
        assert not isinstance(data, str)
        if data.stored is not None:
            parent = data.stored.parent_hash
            assert parent is None or parent in self.blocks, "stored block with unknown parent"
            for b in data.stored.blocks:
                assert b.block_hash not in self.blocks, "block stored twice without removal"
                self.blocks[b.block_hash] = parent
                self.tokens[b.block_hash] = b.tokens_hash
                parent = b.block_hash
        else:
            for h in data.removed.block_hashes:
                assert h in self.blocks, "removal of a block never stored"
                assert h not in self.blocks.values(), "removed a block that still has children"
                del self.blocks[h]
                del self.tokens[h]


def run_until_idle(engine: Engine, replica: IndexReplica | None = None, now: float = 0.0, max_passes: int = 100_000):
    results = []
    for _ in range(max_passes):
        if engine.idle:
            break
        r = engine.step(now)
        engine.pool.check()
        if replica is not None:
            for ev in r.events:
                replica.apply(ev)
        results.append(r)
        now = r.end_ms if r.duration_ms else now + 1.0
    assert engine.idle
    return results, now


# --- timing ---------------------------------------------------------------------------------------


def test_prefill_formula_matches_reference_points():
    assert prefill_ms(0) == 0.0
    assert prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 15.18344 + 16.50142)
    # the reference points of Dynamo's mocker model (k = 1024 tokens): 1k → 32 ms, 4k → 86 ms, 8k → 169 ms, 16k → 378 ms
    for tokens, ms in [(1024, 32.5), (4096, 86), (8192, 169), (16384, 378)]:
        assert prefill_ms(tokens) == pytest.approx(ms, abs=1.0)


def test_decode_formula_matches_reference_points():
    for p, ms in [(0.0, 5.74), (0.25, 17.6), (0.5, 26.3), (1.0, 34.0)]:
        assert decode_ms(p) == pytest.approx(ms, abs=0.1)
    assert decode_ms(2.0) == decode_ms(1.0)  # clamped
    assert decode_ms(-1.0) >= 1.0


def test_pass_duration_is_prefill_plus_decode():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=100, max_num_batched_tokens=1000))
    eng.submit("a", list(range(10)), 3, 0.0)
    r = eng.step(0.0)
    assert r.prefill_tokens == 10 and r.decode_seqs == 0
    assert r.duration_ms == pytest.approx(prefill_ms(10))
    assert [f.request_id for f in r.first_tokens] == ["a"]
    r2 = eng.step(r.end_ms)
    assert r2.prefill_tokens == 0 and r2.decode_seqs == 1
    assert r2.duration_ms == pytest.approx(decode_ms(10 / 400))


# --- block pool -----------------------------------------------------------------------------------


def test_pool_evicts_only_inactive_leaves_lru_first():
    evicted: list[int] = []
    pool = BlockPool(4, evicted.extend)
    assert pool.reserve(3)
    pool.release_anonymous(3)
    pool.tick()
    pool.insert(1, 11, None)
    pool.insert(2, 12, 1)
    pool.insert(3, 13, 2)
    pool.tick()
    pool.insert(9, 19, None)  # an active, unrelated block
    assert pool.used == 4 and pool.free == 0
    for h in (3, 2, 1):
        pool.unref(h)
    pool.check()
    assert pool.inactive == 3 and pool.active == 1
    assert pool.reserve(2)
    assert evicted == [3, 2]  # the leaf first, then its parent once it became a leaf
    assert pool.contains(1) and pool.contains(9)
    assert not pool.reserve(2)  # only block 1 is evictable; 9 is in use
    assert pool.contains(9)
    pool.check()


def test_revived_block_is_not_evicted():
    evicted: list[int] = []
    pool = BlockPool(2, evicted.extend)
    pool.insert(1, 11, None)
    pool.insert(2, 12, None)
    pool.unref(1)
    pool.unref(2)
    pool.tick()
    pool.ref(1)  # a request hit it
    assert pool.reserve(1)
    assert evicted == [2]
    assert not pool.reserve(1)


# --- engine behaviour -------------------------------------------------------------------------------


def test_prefix_reuse_counts_cached_tokens_and_emits_no_duplicate_store():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=64, max_num_batched_tokens=64))
    replica = IndexReplica()
    prompt = list(range(100, 118))  # 18 tokens = 4 full blocks + 2
    eng.submit("a", prompt, 2, 0.0)
    _, now = run_until_idle(eng, replica)
    eng.submit("b", prompt + [7, 8, 9], 2, now)
    results, _ = run_until_idle(eng, replica, now)
    done = [f for r in results for f in r.finished]
    assert done[0].cached_tokens == 16  # 4 leading blocks from "a" (its partial tail is not shared)
    assert eng.stats.prompt_tokens == 18 + 21 and eng.stats.cached_tokens == 16
    assert replica.blocks.keys() == eng.cached_blocks().keys()


def test_tokens_hash_and_block_hash_follow_protocol():
    eng = Engine(EngineConfig(block_size=16, kv_blocks=64, max_num_batched_tokens=64), worker_id=7)
    tokens = list(range(1, 33))
    eng.submit("a", tokens, 1, 0.0)
    r = eng.step(0.0)
    stored = [ev for ev in r.events if ev.kind == "stored"]
    assert len(stored) == 1 and stored[0].worker_id == 7
    blocks = stored[0].event.data.stored.blocks
    assert [b.tokens_hash for b in blocks] == [16863443419780771464, 2287610619914608821]
    assert [b.block_hash for b in blocks] == sequence_hashes(local_block_hashes(tokens, 16))
    assert stored[0].event.data.stored.parent_hash is None


def test_cache_salt_changes_tokens_hash():
    eng = Engine(EngineConfig(block_size=16, kv_blocks=64, max_num_batched_tokens=64))
    eng.submit("a", list(range(1, 33)), 1, 0.0, cache_salt="tenant")
    r = eng.step(0.0)
    assert r.events[0].event.data.stored.blocks[0].tokens_hash != 16863443419780771464


def test_multimodal_objects_enter_the_stored_hashes_as_the_router_computes_them():
    # chunked prefill (16 tokens a step) hashes the prompt in pieces; the image spans blocks 1 and 2
    eng = Engine(EngineConfig(block_size=4, kv_blocks=200, max_num_batched_tokens=16))
    tokens, image = list(range(100, 124)), (0xABCDEF, 6, 4)
    eng.submit("a", tokens, 1, 0.0, multimodal=[image])
    now, stored = 0.0, []
    for _ in range(4):
        r = eng.step(now)
        now = r.end_ms
        stored += [b.tokens_hash for e in r.events if e.kind == "stored" for b in e.event.data.stored.blocks]
    assert stored == local_block_hashes(tokens, 4, 1337, [image])
    assert stored[1] != local_block_hashes(tokens, 4)[1] and stored[0] == local_block_hashes(tokens, 4)[0]


def test_chunked_prefill_respects_token_budget():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=200, max_num_batched_tokens=16))
    eng.submit("a", list(range(40)), 1, 0.0)
    r1 = eng.step(0.0)
    assert r1.prefill_tokens == 16 and not r1.first_tokens
    assert len([e for e in r1.events if e.kind == "stored"]) == 1  # 4 blocks computed so far
    r2 = eng.step(r1.end_ms)
    r3 = eng.step(r2.end_ms)
    assert (r2.prefill_tokens, r3.prefill_tokens) == (16, 8)
    assert [f.request_id for f in r3.finished] == ["a"]


def test_max_num_seqs_limits_admission():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=200, max_num_batched_tokens=1000, max_num_seqs=2))
    for i in range(3):
        eng.submit(f"r{i}", [i * 100 + j for j in range(8)], 5, 0.0)
    eng.step(0.0)
    assert len(eng.running) == 2 and len(eng.waiting) == 1


def test_watermark_and_oversized_requests_are_rejected_up_front():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=10, watermark=0.2))
    rej = eng.submit("big", list(range(40)), 1, 0.0)
    assert rej is not None and "blocks" in rej.reason
    assert eng.idle


def test_preemption_when_decode_cannot_get_a_block():
    eng = Engine(EngineConfig(block_size=4, kv_blocks=8, max_num_batched_tokens=100, watermark=0.0))
    replica = IndexReplica()
    eng.submit("a", list(range(0, 11)), 12, 0.0)
    eng.submit("b", list(range(50, 61)), 12, 0.0)
    results, _ = run_until_idle(eng, replica)
    done = {f.request_id: f for r in results for f in r.finished}
    assert set(done) == {"a", "b"}
    assert all(f.output_tokens == 12 for f in done.values())
    assert eng.stats.preemptions >= 1
    assert replica.blocks.keys() == eng.cached_blocks().keys()


def test_deterministic():
    def run() -> list[tuple]:
        eng = Engine(EngineConfig(block_size=4, kv_blocks=40, max_num_batched_tokens=32, max_num_seqs=4))
        rng = random.Random(3)
        for i in range(20):
            eng.submit(f"r{i}", [rng.randrange(6) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 9), float(i))
        results, _ = run_until_idle(eng)
        return [(f.request_id, f.at_ms, f.cached_tokens) for r in results for f in r.finished]

    assert run() == run()


workload = st.lists(
    st.tuples(
        st.integers(0, 3),  # which shared prefix
        st.integers(0, 40),  # prefix length used
        st.integers(0, 20),  # unique suffix length
        st.integers(1, 10),  # output tokens
        st.integers(0, 3),  # passes to run before the next arrival
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload,
    st.integers(4, 40),
    st.sampled_from([2, 4, 8]),
    st.integers(4, 64),
    st.integers(1, 6),
)
def test_pool_invariants_and_events_reproduce_cache(reqs, kv_blocks, block_size, budget, max_seqs):
    cfg = EngineConfig(block_size=block_size, kv_blocks=kv_blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    eng = Engine(cfg, worker_id=3)
    replica = IndexReplica()
    prefixes = [[1000 * p + i for i in range(40)] for p in range(4)]
    now = 0.0
    submitted = 0
    for n, (p, plen, slen, out, gap) in enumerate(reqs):
        prompt = prefixes[p][:plen] + [50_000 + 100 * n + i for i in range(slen)]
        if not prompt:
            prompt = [1]
        if eng.submit(f"r{n}", prompt, out, now) is None:
            submitted += 1
        for _ in range(gap):
            r = eng.step(now)
            eng.pool.check()
            for ev in r.events:
                replica.apply(ev)
            assert eng.pool.active <= cfg.kv_blocks
            now = r.end_ms + 0.5
    results, _ = run_until_idle(eng, replica, now)
    assert eng.stats.finished == submitted
    # after everything finished, nothing is active; every cached block is inactive
    assert eng.pool.active == 0 and eng.pool.anonymous == 0
    assert eng.pool.inactive == len(eng.pool.blocks) <= cfg.kv_blocks
    assert replica.blocks == eng.cached_blocks()
    assert eng.stats.cached_tokens <= eng.stats.prompt_tokens


def _drive(eng: Engine, fused: bool, replica: IndexReplica, split: int = 0) -> dict[str, float]:
    now, finished = 0.0, {}
    eng.fused_commits = 0  # type: ignore[attr-defined]
    while not eng.idle:
        plan = eng.plan_decode(16) if fused else None
        r = None
        if plan:
            steps = min(split, len(plan)) if split else len(plan)
            r = eng.commit_decode(now, plan, steps)
            eng.fused_commits += r is not None  # type: ignore[attr-defined]
        if r is None:
            r = eng.step(now)
        eng.pool.check()
        for ev in r.events:
            replica.apply(ev)
        finished.update({f.request_id: f.at_ms for f in r.finished})
        now = r.end_ms if r.duration_ms else now + 1.0
    return finished


@pytest.mark.parametrize("split", [0, 1, 3])
def test_fused_decode_matches_stepping(split):
    def make() -> Engine:
        eng = Engine(EngineConfig(block_size=4, kv_blocks=60, max_num_batched_tokens=64, max_num_seqs=8))
        rng = random.Random(5)
        for i in range(12):
            eng.submit(f"r{i}", [rng.randrange(5) for _ in range(rng.randrange(1, 25))], rng.randrange(1, 30), 0.0)
        return eng

    a, b = make(), make()
    ra, rb = IndexReplica(), IndexReplica()
    fa = _drive(a, False, ra)
    fb = _drive(b, True, rb, split)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fb[k] == pytest.approx(fa[k])
    assert a.cached_blocks() == b.cached_blocks() == ra.blocks == rb.blocks
    assert a.stats.passes == b.stats.passes and a.stats.output_tokens == b.stats.output_tokens
    assert b.fused_commits > 0
