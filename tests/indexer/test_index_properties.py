"""Property tests: the radix tree agrees with a brute-force model on any event sequence, and its
dump and snapshot rebuild an identical index."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.events import cleared_event, removed_event, stored_event
from services.indexer.index import PrefixIndex
from services.indexer.treecodec import decode_snapshot, encode_snapshot

from .model import ModelIndex

WORKERS = st.integers(1, 2)
DP = st.sampled_from([0, 0, 1])
ENGINE = st.integers(1, 6)
LOCAL = st.integers(1, 3)
TIER = st.sampled_from(["device", "device", "device", "host_pinned", "disk"])

store_op = st.tuples(
    st.just("store"), WORKERS, DP, TIER, st.one_of(st.none(), ENGINE), st.lists(st.tuples(ENGINE, LOCAL), min_size=1, max_size=4)
)
remove_op = st.tuples(st.just("remove"), WORKERS, DP, TIER, st.lists(ENGINE, min_size=1, max_size=3))
clear_op = st.tuples(st.just("clear"), WORKERS, DP)
drop_op = st.tuples(st.just("drop_worker"), WORKERS)
id_jump = st.sampled_from([1, 1, 1, 1, 1, 1, 0, -1, 2])  # mostly consecutive; some repeats, stale ids and gaps
OPS = st.lists(st.tuples(st.one_of(store_op, store_op, remove_op, clear_op, drop_op), id_jump), max_size=40)
QUERIES = st.lists(st.lists(LOCAL, min_size=1, max_size=5), min_size=1, max_size=6)


def build(ops):
    next_id: dict[tuple[int, int], int] = {}
    out = []
    for op, jump in ops:
        if op[0] == "drop_worker":
            out.append(("drop_worker", op[1]))
            for k in [k for k in next_id if k[0] == op[1]]:
                del next_id[k]
            continue
        key = (op[1], op[2])
        eid = max(0, next_id.get(key, 0) + jump - 1)
        next_id[key] = eid + 1
        if op[0] == "store":
            out.append(stored_event(op[1], eid, op[5], op[4], op[2], op[3]))
        elif op[0] == "remove":
            out.append(removed_event(op[1], eid, op[4], op[2], op[3]))
        else:
            out.append(cleared_event(op[1], eid, op[2]))
    return out


def run(events, probes=(), min_run=4):
    """Apply to both; after every step also compare a few matches, so caches inside the index
    (tree sizes, mask → workers, runs) are checked while the index changes, not only at the end."""
    index, model = PrefixIndex(min_run=min_run), ModelIndex()
    for ev in events:
        if isinstance(ev, tuple):
            index.remove_worker(ev[1])
            model.remove_worker(ev[1])
        else:
            assert index.apply(ev) == model.apply(ev)
        for q in probes:
            got = index.find_matches(q)
            assert got.scores == model.scores(q) and got.tree_sizes == model.tree_sizes()
    return index, model


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, QUERIES)
@example(  # one worker maps two engine hashes onto one path, then drops one of them
    [(("store", 1, 0, "device", None, [(1, 1)]), 1), (("store", 1, 0, "device", None, [(2, 1)]), 1), (("remove", 1, 0, "device", [1]), 1)],
    [[1]],
)
def test_matches_agree_with_brute_force_model(ops, queries):
    index, model = run(build(ops), probes=[[1, 2, 3], [2, 1], [3], *queries[:2]])
    paths = sorted({p for by_tier in model.workers.values() for lk in by_tier.values() for p in lk.values()})
    for q in [*queries, *[list(p) + [9] for p in paths]]:
        got = index.find_matches(q)
        assert got.scores == model.scores(q)
        assert got.tier_scores == model.tier_scores(q)
        assert got.tree_sizes == model.tree_sizes()
        lower = index.find_matches(q, early_exit=True).scores
        assert lower == model.early_exit_scores(q)  # Dynamo's early exit, exactly
        for k, v in lower.items():  # lower bounds of the exact scores
            assert 0 < v <= got.scores[k]
    assert index.cursors == model.cursors


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, QUERIES)
def test_dump_replay_and_snapshot_rebuild_identical_index(ops, queries):
    index, _ = run(build(ops))
    dump = index.dump()
    replayed = PrefixIndex()
    for ev in dump:
        assert replayed.apply(ev) == "ok"
    assert replayed.dump() == dump
    steps, pieces = index.snapshot_steps(step=2), 0
    while True:  # serialised in pieces of ~2 nodes, as the app does between event-loop turns
        try:
            next(steps)
            pieces += 1
        except StopIteration as done:
            assert done.value == index.to_snapshot()
            break
    assert pieces >= index.nodes // 2
    restored, seq, _ = decode_snapshot(encode_snapshot(index, 42))
    assert seq == 42
    assert restored.dump() == dump
    assert restored.cursors == index.cursors
    assert restored.nodes == index.nodes == replayed.nodes
    assert restored.digest() == replayed.digest() == index.digest()  # what replicas compare (GET /digest)
    for q in queries:
        want = index.find_matches(q)
        assert replayed.find_matches(q) == want
        assert restored.find_matches(q) == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_no_dangling_nodes_after_everything_is_removed(ops):
    index, _ = run(build(ops))
    for key in index.worker_keys():
        index.remove_worker(key[0])
    assert index.nodes == 0 and index.root.children is None and index.blocks == 0
    assert index.lower_tier_blocks == 0


# Long chains over a tiny alphabet of local hashes, so paths are shared by several workers and masks
# change along them: runs get built by matches, then invalidated by later events.
long_store_op = st.tuples(
    st.just("store"), st.integers(1, 3), st.just(0), st.just("device"), st.one_of(st.none(), st.integers(1, 12)),
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 2)), min_size=1, max_size=8),
)
long_remove_op = st.tuples(st.just("remove"), st.integers(1, 3), st.just(0), st.just("device"), st.lists(st.integers(1, 12), min_size=1, max_size=4))
LONG_OPS = st.lists(
    st.tuples(st.one_of(long_store_op, long_store_op, long_store_op, long_remove_op, clear_op, drop_op), st.just(1)), max_size=30
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LONG_OPS, st.sampled_from([1, 2, 3]))  # 1 is raised to 2
def test_runs_built_by_matches_never_change_a_later_match(ops, min_run):
    index, model = PrefixIndex(min_run=min_run), ModelIndex()
    for ev in build(ops):
        if isinstance(ev, tuple):
            index.remove_worker(ev[1])
            model.remove_worker(ev[1])
        else:
            index.apply(ev)
            model.apply(ev)
        paths = {p for by_tier in model.workers.values() for lk in by_tier.values() for p in lk.values()}
        probes = sorted({p[:i] for p in paths for i in range(1, len(p) + 1)} | {p + (2, 1, 1) for p in paths})
        for q in probes:  # every prefix of every held path, and past their ends
            got = index.find_matches(list(q))
            assert got.scores == model.scores(list(q)), q
            early = index.find_matches(list(q), early_exit=True).scores
            assert early == model.early_exit_scores(list(q)), q
            for k, v in early.items():
                assert 0 < v <= got.scores[k]


def test_early_exit_scores_the_last_worker_through_the_block_where_it_became_the_only_one():
    """Seed behaviour: the last worker's score stopped one block short of where Dynamo stops."""
    index = PrefixIndex(min_run=2)
    index.apply(stored_event(1, 0, [(100 + i, 10 + i) for i in range(6)]))  # worker 1: 6 blocks
    index.apply(stored_event(2, 0, [(200 + i, 10 + i) for i in range(2)]))  # worker 2: the first 2
    query = [10 + i for i in range(6)]
    for _ in range(3):  # the later walks go through runs
        assert index.find_matches(query).scores == {(1, 0): 6, (2, 0): 2}
        assert index.find_matches(query, early_exit=True).scores == {(1, 0): 3, (2, 0): 2}


def test_a_second_match_builds_a_run_and_a_mask_change_inside_it_invalidates_it():
    chain = [(100 + i, 10 + i) for i in range(10)]
    index = PrefixIndex(min_run=4)
    index.apply(stored_event(1, 0, chain))
    query = [t for _, t in chain]
    assert index.find_matches(query).scores == {(1, 0): 10}
    first = index.root.children[10]
    assert first.run is not None and not first.run.valid  # the first walk only marks the stretch
    assert index.find_matches(query).scores == {(1, 0): 10}
    run = first.run
    assert run.valid and run.keys == query[1:] and run.end.key == 19
    assert index.find_matches(query).scores == {(1, 0): 10}  # through the run

    # worker 2 stores the first five blocks: their masks change, so the run must not be used
    index.apply(stored_event(2, 0, chain[:5]))
    assert not run.valid
    for _ in range(2):
        assert index.find_matches(query).scores == {(1, 0): 10, (2, 0): 5}
    # walked twice again: two equal-mask stretches, {1,2} for blocks 1-5, {1} for blocks 6-10
    assert first.run.valid and first.run.length == 4
    sixth = first.run.end.children[15]
    assert sixth.run.valid and sixth.run.keys == query[6:]
    assert index.find_matches(query).scores == {(1, 0): 10, (2, 0): 5}

    # removing a block in the middle of a run cuts worker 1's prefix there
    index.apply(removed_event(1, 1, [107]))
    assert not sixth.run.valid
    assert index.find_matches(query).scores == {(1, 0): 7, (2, 0): 5}


def test_the_digest_tells_different_indexes_apart() -> None:
    a, b = PrefixIndex(), PrefixIndex()
    for index in (a, b):
        index.apply(stored_event(1, 0, [(10, 1), (11, 2)]))
    assert a.digest() == b.digest()
    b.apply(removed_event(1, 1, [11]))
    assert a.digest() != b.digest()
    a.apply(removed_event(1, 1, [11]))
    assert a.digest() == b.digest()
    a.apply(stored_event(2, 0, [(10, 1)]))  # same block, another worker
    assert a.digest() != b.digest()
