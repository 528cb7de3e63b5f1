"""Pure relay core: tolerant decoding of both vLLM encodings, conversion rules, batching, ids, seq tracking."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.lib.fake_engine import BlockPoolSim, EventBatch, FakeEngine
from bench.lib.refindex import RefIndex
from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, salt_seed
from services.relay.convert import Converter, storage_tier
from services.relay.decode import (
    AllBlocksCleared,
    BadBatch,
    BadEvent,
    BlockRemoved,
    BlockStored,
    block_hash,
    decode_batch,
)
from services.relay.ingest import parse_replay_frames, rank_endpoints
from services.relay.seqtrack import SeqTracker, SeqVerdict
from services.runtime.kv_publisher import OutBuffer, Pending

enc = msgspec.msgpack.encode
TOKENS = list(range(1, 33))  # docs/protocol.md §6 test vector: 2 blocks of 16
VECTOR = [16863443419780771464, 2287610619914608821]


def engine(encoding: str, **kw) -> FakeEngine:
    return FakeEngine(0, encoding=encoding, **kw)  # sockets are not opened by these tests


def batch(eng: FakeEngine, events: list) -> bytes:
    return enc(EventBatch(1.5, events, eng.dp_rank))


def stores(events: list[RouterEvent]) -> list[list[tuple[int, int]]]:
    return [[(b.block_hash, b.tokens_hash) for b in e.event.data.stored.blocks] for e in events if e.kind == "stored"]


# -- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["legacy", "map"])
def test_both_encodings_decode_to_the_same_events(encoding):
    eng = engine(encoding)
    ev, digests = eng.stored(TOKENS, lora_name="ad")
    out = decode_batch(batch(eng, [ev, eng.removed(digests[:1]), eng.cleared()]))
    assert out.ts == 1.5 and out.dp_rank == 0
    stored, removed, cleared = out.events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved) and isinstance(cleared, AllBlocksCleared)
    assert stored.block_hashes == [int.from_bytes(d[-8:], "big") for d in digests]
    assert stored.token_ids == TOKENS and stored.block_size == 16 and stored.medium == "GPU" and stored.lora_name == "ad"
    assert removed.block_hashes == stored.block_hashes[:1]


def test_byte_hashes_use_low_64_bits_and_negative_ints_are_reinterpreted():
    eng = engine("map", hash_bytes=True)
    ev, digests = eng.stored(TOKENS)
    out = decode_batch(batch(eng, [ev]))
    assert out.events[0].block_hashes == [int.from_bytes(d[-8:], "big") for d in digests]
    assert block_hash(-1) == 2**64 - 1
    assert block_hash(b"\x01" * 4) == 0x01010101
    legacy = enc([0.0, [["BlockRemoved", [-2, 5], None]], 3])
    assert decode_batch(legacy).events[0].block_hashes == [2**64 - 2, 5]


def test_map_envelope_unknown_fields_and_unknown_events():
    payload = enc(
        {
            "ts": 2.0,
            "dp_rank": 4,
            "events": [
                {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None, "token_ids": list(range(16)),
                 "block_size": 16, "future_field": {"x": 1}},
                ["BlockRemoved", [7], "GPU", 0, "LOCAL", "some-newer-field"],
                {"type": "SomethingNew", "x": 1},
                ["BlockStored", "not-a-list", None, [], 16],
                42,
            ],
        }
    )
    out = decode_batch(payload)
    assert out.dp_rank == 4
    kinds = [type(e).__name__ for e in out.events]
    assert kinds == ["BlockStored", "BlockRemoved", "BadEvent", "BadEvent", "BadEvent"]
    assert [e.reason for e in out.events if isinstance(e, BadEvent)] == ["unknown_event", "bad_event", "bad_event"]


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"\xc1\xc1", "bad_msgpack"),
        (enc("hello"), "bad_envelope"),
        (enc([1.0]), "bad_envelope"),
        (enc([1.0, "events", 0]), "bad_envelope"),
        (enc({"ts": 1.0}), "bad_envelope"),
        (enc(["x", [], 0]), "bad_envelope"),
        (enc([1.0, [], -1]), "bad_envelope"),
    ],
)
def test_bad_batches_raise_with_a_reason(payload, reason):
    with pytest.raises(BadBatch) as err:
        decode_batch(payload)
    assert err.value.reason == reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_never_raises_anything_but_badbatch(data):
    with contextlib.suppress(BadBatch):
        decode_batch(data)


_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=9)
_obj = st.recursive(_leaf, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=30)
_event = st.one_of(
    st.tuples(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "X"]), _obj, _obj, _obj, _obj).map(list),
    st.dictionaries(st.sampled_from(["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "medium"]), _obj),
    _obj,
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_event, max_size=5), _obj)
def test_wrong_types_anywhere_are_reported_never_raised(events, rank):
    try:
        out = decode_batch(enc([1.0, events, rank]))
    except BadBatch:
        return
    conv = Converter(1, 4)
    for ev in conv.convert(0, out.events):
        msgspec.msgpack.decode(msgspec.msgpack.encode(ev), type=RouterEvent)  # valid wire events only


# -- convert --------------------------------------------------------------------------------------


def convert(conv: Converter, eng: FakeEngine, events: list, rank: int = 0) -> list[RouterEvent]:
    return conv.convert(rank, decode_batch(batch(eng, events)).events)


@pytest.mark.parametrize("encoding", ["legacy", "map"])
def test_stored_removed_cleared_become_router_events(encoding):
    eng, conv = engine(encoding), Converter(7, 16)
    ev, digests = eng.stored(TOKENS)
    out = convert(conv, eng, [ev])
    assert len(out) == 1 and out[0].worker_id == 7 and out[0].storage_tier == "device"
    assert out[0].event.event_id == 1 and out[0].event.data.stored.parent_hash is None
    hashes = [int.from_bytes(d[-8:], "big") for d in digests]
    assert stores(out) == [list(zip(hashes, VECTOR, strict=False))]
    out = convert(conv, eng, [eng.removed(digests[1:]), eng.cleared()])
    assert [e.kind for e in out] == ["removed", "cleared"]
    assert out[0].event.data.removed.block_hashes == hashes[1:]
    assert [e.event.event_id for e in out] == [2, 3]


def test_lora_and_cache_salt_seed_the_tokens_hash_and_continuations_inherit_the_salt():
    eng, conv = engine("map"), Converter(1, 16)
    ev, digests = eng.stored(TOKENS, lora_name="ad", cache_salt="s3cret")
    first = stores(convert(conv, eng, [ev]))[0]
    seed = salt_seed("ad", "s3cret")
    assert [t for _, t in first] == local_block_hashes(TOKENS, 16, seed)
    more = list(range(100, 116))
    ev2, _ = eng.stored(more, parent=digests[-1], lora_name="ad")
    second = stores(convert(conv, eng, [ev2]))[0]
    assert [t for _, t in second] == local_block_hashes(more, 16, seed)
    # an explicit cache_salt field (SGLang's BlockStoredWithMetadata) wins
    sglang = enc([0.0, [{"type": "BlockStoredWithMetadata", "block_hashes": [9], "parent_block_hash": None,
                         "token_ids": TOKENS[:16], "block_size": 16, "cache_salt": "x"}]])
    ev3 = decode_batch(sglang).events
    assert stores(conv.convert(0, ev3))[0][0][1] == local_block_hashes(TOKENS[:16], 16, salt_seed(None, "x"))[0]


def test_partial_block_is_cut_and_block_size_mismatch_is_skipped():
    conv = Converter(1, 16)
    ev = BlockStored([1, 2, 3], None, list(range(40)), 16, "GPU", None, None, None, None)
    out = conv.convert(0, [ev])
    assert [b for b, _ in stores(out)[0]] == [1, 2]
    assert conv.counts["stores_cut"] == 1
    ev = BlockStored([5], None, list(range(32)), 32, "GPU", None, None, None, None)
    assert conv.convert(0, [ev]) == [] and conv.counts["block_size_mismatch"] == 1


def test_token_less_offload_store_resolves_through_learned_hashes():
    eng, conv = engine("map"), Converter(1, 16)
    ev, digests = eng.stored(TOKENS + list(range(50, 66)))
    gpu = stores(convert(conv, eng, [ev]))[0]
    offload, _ = eng.stored(TOKENS + list(range(50, 66)), medium="CPU", token_less=True)
    out = convert(conv, eng, [offload])
    assert out[0].storage_tier == "host_pinned" and stores(out)[0] == gpu
    # unknown hash: cut there
    unknown = BlockStored([gpu[0][0], 999, gpu[2][0]], None, [], None, "CPU_TIER2", None, None, None, None)
    out = conv.convert(0, [unknown])
    assert out[0].storage_tier == "disk" and stores(out)[0] == gpu[:1]
    assert conv.counts["unresolved_stores"] == 1


def test_holders_per_kv_group_repeated_stores_are_idempotent_and_the_last_group_removes():
    eng, conv = engine("map"), Converter(1, 16)
    ev, digests = eng.stored(TOKENS, group_idx=0)
    ev_again, _ = eng.stored(TOKENS, group_idx=1)
    out = convert(conv, eng, [ev, ev_again])
    assert len(out) == 1 and conv.counts["dedup_stores"] == 1
    assert convert(conv, eng, [eng.removed(digests, group_idx=0)]) == []  # group 1 still holds them
    out = convert(conv, eng, [eng.removed(digests, group_idx=1)])  # the last group: forwarded
    assert [e.kind for e in out] == ["removed"]
    out = convert(conv, eng, [eng.removed(digests, group_idx=1)])  # never seen now: forwarded unchanged
    assert [e.kind for e in out] == ["removed"]


def test_full_report_mode_restores_are_idempotent_so_one_remove_per_hash_drops_the_block():
    # vLLM with kv_cache_report_mode="full" re-reports cached blocks on every prefix hit and removes
    # each hash once: counting each store as a reference would swallow that removal (stale blocks).
    eng, conv = engine("map"), Converter(1, 16)
    ev, digests = eng.stored(TOKENS, group_idx=0)
    assert len(convert(conv, eng, [ev])) == 1
    for _ in range(3):
        assert convert(conv, eng, [eng.stored(TOKENS, group_idx=0)[0]]) == []  # prefix hits
    out = convert(conv, eng, [eng.removed(digests[1:], group_idx=0)])
    assert [e.kind for e in out] == ["removed"] and len(out[0].event.data.removed.block_hashes) == 1
    # Without group_idx (older vLLM, SGLang) the same holds: one group, idempotent stores.
    ev, digests = eng.stored(list(range(300, 332)))
    for _ in range(2):
        convert(conv, eng, [ev])
    assert [e.kind for e in convert(conv, eng, [eng.removed(digests)])] == ["removed"]
    # A remove without a group of a block stored by groups drops it from every group.
    ev0, digests = eng.stored(list(range(500, 516)), group_idx=0)
    ev1, _ = eng.stored(list(range(500, 516)), group_idx=1)
    convert(conv, eng, [ev0, ev1])
    assert [e.kind for e in convert(conv, eng, [eng.removed(digests)])] == ["removed"]


hash_ops = st.lists(
    st.tuples(st.sampled_from(["store", "remove"]), st.lists(st.integers(0, 5), min_size=1, max_size=3),
              st.sampled_from([None, 0, 1, 2])),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(hash_ops)
def test_forwarded_blocks_equal_a_brute_force_model_of_holders_per_group(ops):
    # Model: the set of (hash, group) pairs the engine holds; a hash is indexed while any pair holds
    # it. A remove without a group of a hash only held by groups drops every group.
    conv = Converter(1, 1)
    holders: set[tuple[int, int | None]] = set()
    index: set[int] = set()
    for op, hashes, group in ops:
        if op == "store":
            holders |= {(h, group) for h in hashes}
            ev = BlockStored([1000 + h for h in hashes], None, list(hashes), 1, "GPU", None, None, None, group)
        else:
            for h in hashes:
                if group is None and (h, None) not in holders:
                    holders = {p for p in holders if p[0] != h}
                holders.discard((h, group))
            ev = BlockRemoved([1000 + h for h in hashes], "GPU", group)
        for out in conv.convert(0, [ev]):
            if out.kind == "stored":
                index |= {b.block_hash for b in out.event.data.stored.blocks}
            elif out.kind == "removed":
                index -= set(out.event.data.removed.block_hashes)
        assert index == {1000 + h for h, _ in holders}


@pytest.mark.parametrize(("groups", "capacity"), [((None,), 24), ((0,), 24), ((0, 1), {0: 24, 1: 10})])
@pytest.mark.parametrize("full_report", [False, True])
def test_vllm_block_pool_leaves_no_stale_and_no_missing_blocks(groups, capacity, full_report):
    import random

    rng = random.Random(7)
    eng, conv = engine("map"), Converter(3, 16)
    pool = BlockPoolSim(eng, capacity, groups)
    prefixes = [[rng.randrange(1, 1000) for _ in range(16 * rng.randrange(1, 4))] for _ in range(12)]
    index = RefIndex().apply_all(conv.clear(0))
    for _ in range(300):
        tokens = rng.choice(prefixes) + [rng.randrange(1, 1000) for _ in range(16 * rng.randrange(0, 3))]
        index.apply_all(convert(conv, eng, pool.request(tokens, full_report=full_report)))
        held = {h for _, h, _ in next(iter(index.state().values()), set())}
        assert held == pool.cached()  # no stale block (evicted but indexed), none missing


def test_batching_merges_chains_and_removes_and_respects_the_cap():
    eng, conv = engine("legacy"), Converter(1, 16, max_batch_blocks=3)
    toks = list(range(16 * 5))
    a, da = eng.stored(toks[:32])
    b, db = eng.stored(toks[32:64], parent=da[-1])
    c, dc = eng.stored(toks[64:], parent=db[-1])
    unrelated, du = eng.stored(list(range(900, 916)))
    out = convert(conv, eng, [a, b, c, unrelated, eng.removed(da[:1]), eng.removed(db), eng.cleared(), eng.removed(dc)])
    shape = [(e.kind, len(e.event.data.stored.blocks) if e.kind == "stored" else None) for e in out]
    # a+b would be 4 > 3 blocks: a alone, then b+c chained (3), unrelated (new root)
    assert shape == [("stored", 2), ("stored", 3), ("stored", 1), ("removed", None), ("cleared", None), ("removed", None)]
    assert out[1].event.data.stored.parent_hash == int.from_bytes(da[-1][-8:], "big")
    assert out[3].event.data.removed.block_hashes == [int.from_bytes(d[-8:], "big") for d in da[:1] + db]
    assert [e.event.event_id for e in out] == list(range(1, 7))


def test_oversized_store_is_split_into_a_chain():
    conv = Converter(1, 4, max_batch_blocks=2)
    ev = BlockStored([1, 2, 3, 4, 5], 77, list(range(20)), 4, None, None, None, None, None)
    out = conv.convert(0, [ev])
    assert [e.event.data.stored.parent_hash for e in out] == [77, 2, 4]
    assert [len(e.event.data.stored.blocks) for e in out] == [2, 2, 1]


def test_ids_are_per_rank_continue_from_restored_mark_and_never_go_back():
    conv = Converter(1, 16)
    conv.set_next_id(1, 500)
    assert conv.clear(1)[0].event.event_id == 500
    assert conv.clear(0)[0].event.event_id == 1
    conv.set_next_id(1, 10)  # an older mark never moves ids back
    assert conv.clear(1)[0].event.event_id == 501
    assert conv.clear(1)[0].event.dp_rank == 1


def test_storage_tier_mapping():
    assert [storage_tier(m) for m in (None, "GPU", "cpu", "CPU_TIER1", "CPU_TIER2", "STORAGE", "NVME", "REMOTE")] == [
        "device", "device", "host_pinned", "host_pinned", "disk", "disk", "disk", "external"]
    assert storage_tier("QUANTUM") is None


# -- seq tracking, endpoints, replay frames -------------------------------------------------------


def test_seq_tracker_verdicts():
    t = SeqTracker()
    assert t.classify(5) is SeqVerdict.FIRST
    t.applied(5)
    assert t.classify(6) is SeqVerdict.NEXT
    assert t.classify(9) is SeqVerdict.GAP
    assert t.classify(5) is SeqVerdict.RESTART and t.classify(0) is SeqVerdict.RESTART
    # gap at 9: replay delivered 6..12; live 10..12 are duplicates, 13 is next
    for s in range(6, 13):
        t.applied(s)
    t.replayed(trigger=9, through=12)
    assert [t.classify(s) for s in (10, 11, 12, 13)] == [SeqVerdict.DUPLICATE] * 3 + [SeqVerdict.NEXT]
    t.applied(13)
    assert t.classify(11) is SeqVerdict.RESTART


def test_rank_endpoints_and_replay_frames():
    assert rank_endpoints(["tcp://h:5557"], 0, 3) == {0: "tcp://h:5557", 1: "tcp://h:5558", 2: "tcp://h:5559"}
    assert rank_endpoints(["tcp://a:1", "tcp://b:2"], 4, 2) == {4: "tcp://a:1", 5: "tcp://b:2"}
    assert rank_endpoints([], 0, 1) == {}
    with pytest.raises(ValueError):
        rank_endpoints(["tcp://a:1", "tcp://b:2"], 0, 3)
    seq = (7).to_bytes(8, "big")
    assert parse_replay_frames([b"", b"topic", seq, b"p"]) == (7, b"p")
    assert parse_replay_frames([b"", seq, b"p"]) == (7, b"p")
    assert parse_replay_frames([seq, b"p"]) == (7, b"p")
    assert parse_replay_frames([b"", b"", b"\xff" * 8, b""]) == (-1, b"")
    assert parse_replay_frames([b"x"]) is None and parse_replay_frames([b"", b"123", b"p"]) is None


def _stores_of(eng: FakeEngine, n: int, start: int = 0) -> list[bytes]:
    """n engine batches, one 1-block store each (batch i stores tokens i*16 … i*16+15)."""
    return [batch(eng, [eng.stored(list(range(i * 16, i * 16 + 16)))[0]]) for i in range(start, start + n)]


def _buffer(conv: Converter, max_batches: int, max_bytes: int = 1 << 62) -> OutBuffer:
    def convert(item: Pending) -> list[RouterEvent]:
        if item.payload is None:
            return conv.clear(item.dp_rank)
        return conv.convert(item.dp_rank, decode_batch(item.payload).events)

    return OutBuffer(convert, max_batches, max_bytes)


def test_out_buffer_converts_when_taken_and_coalesces_one_rank_up_to_the_caps():
    eng, conv = engine("map"), Converter(1, 16)
    buf = _buffer(conv, 10)
    for payload in _stores_of(eng, 3):
        assert buf.push(Pending(0, payload)) == []
    buf.push(Pending(1, None, "start"))
    buf.push(Pending(0, _stores_of(eng, 1, 3)[0]))
    assert conv.next_id(0) == 1  # nothing converted yet
    first = buf.next_message(max_events=2)
    assert first is not None and first.dp_rank == 0 and [e.event.event_id for e in first.events] == [1, 2]
    second = buf.next_message(max_events=10)  # the third rank-0 batch; the next item is rank 1
    assert second is not None and [e.event.event_id for e in second.events] == [3]
    third = buf.next_message(10)
    assert third is not None and (third.dp_rank, [e.kind for e in third.events]) == (1, ["cleared"])
    last = buf.next_message(10, max_blocks=1)
    assert last is not None and last.n_blocks == 1 and buf.next_message(10) is None and len(buf) == 0


def test_a_batch_over_the_caps_is_carried_into_the_next_messages_in_order():
    eng, conv = engine("map"), Converter(1, 16, max_batch_blocks=2)
    buf = _buffer(conv, 10)
    buf.push(Pending(0, batch(eng, [eng.stored(list(range(16 * 7)))[0]])))  # 7 blocks → 4 events
    buf.push(Pending(0, _stores_of(eng, 1, 100)[0]))
    sizes = []
    while (msg := buf.next_message(max_events=10, max_blocks=3)) is not None:
        sizes.append([len(e.event.data.stored.blocks) for e in msg.events])
    assert sizes == [[2], [2], [2, 1], [1]]  # ids stay in order across the carry


def test_overflow_keeps_the_newest_batches_and_costs_one_clear_per_rank_per_episode():
    eng, conv = engine("map"), Converter(1, 16)
    buf = _buffer(conv, 5)
    payloads = _stores_of(eng, 40)
    dropped = 0
    for i, payload in enumerate(payloads[:20]):
        dropped += len(buf.push(Pending(i % 2, payload)))
    assert dropped == 15 and buf.overflows == 2 and buf.pending_clears() == [0, 1]
    out = []
    while (msg := buf.next_message(100)) is not None:
        out.extend(msg.events)
    kinds = [(e.event.dp_rank, e.kind) for e in out]
    assert kinds.count((0, "cleared")) == 1 and kinds.count((1, "cleared")) == 1
    # Each rank's cleared comes first; then exactly the 5 newest batches, converted from scratch.
    for rank in (0, 1):
        mine = [e for e in out if e.event.dp_rank == rank]
        assert mine[0].kind == "cleared"
        kept = [payloads[i] for i in range(15, 20) if i % 2 == rank]
        fresh = Converter(1, 16)
        want = [b for p in kept for e in fresh.convert(rank, decode_batch(p).events) for b in e.event.data.stored.blocks]
        assert [b for e in mine[1:] for b in e.event.data.stored.blocks] == want
    # The episode ended when the clear was taken: a later overflow costs one more clear.
    for payload in payloads[20:27]:
        buf.push(Pending(0, payload))
    assert buf.overflows == 3 and buf.pending_clears() == [0]


def test_overflow_by_bytes_drops_oldest_and_an_oversized_batch_still_fits_alone():
    eng, conv = engine("map"), Converter(1, 16)
    payloads = _stores_of(eng, 4)
    buf = _buffer(conv, 100, max_bytes=2 * len(payloads[0]) + 1)
    for payload in payloads:
        buf.push(Pending(0, payload))
    assert len(buf) == 3 and buf.dropped_batches == 2 and buf.bytes <= buf.max_bytes  # 2 batches + 1 clear
    big = batch(eng, [eng.stored(list(range(16 * 40)))[0]])
    buf.push(Pending(0, big))
    assert buf.bytes == len(big) and buf.dropped_batches == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["push0", "push1", "take"]), st.integers(1, 4)), max_size=80), st.integers(1, 6))
def test_out_buffer_index_always_equals_a_fold_of_the_batches_kept_after_the_last_clear(ops, bound):
    # Brute force: per rank, the index equals a fresh conversion of the batches that were published
    # after the rank's last clear (overflow or not), i.e. nothing dropped leaves a trace.
    eng, conv = engine("map"), Converter(1, 16)
    buf = _buffer(conv, bound)
    published: list[RouterEvent] = []
    taken_payloads: dict[int, list[bytes]] = {0: [], 1: []}
    payload_of: dict[int, tuple[int, bytes]] = {}
    n = 0

    def convert(item: Pending) -> list[RouterEvent]:
        if item.payload is None:
            taken_payloads[item.dp_rank] = []
            return conv.clear(item.dp_rank)
        taken_payloads[item.dp_rank].append(item.payload)
        return conv.convert(item.dp_rank, decode_batch(item.payload).events)

    buf.convert = convert
    for op, k in ops:
        if op == "take":
            for _ in range(k):
                msg = buf.next_message(3)
                if msg is not None:
                    published.extend(msg.events)
            continue
        rank = 0 if op == "push0" else 1
        # Repeated blocks (n % 5) make stores depend on the converter's refcounts.
        payload = batch(eng, [eng.stored(list(range((n % 5) * 16, (n % 5) * 16 + 16)))[0]])
        payload_of[n] = (rank, payload)
        n += 1
        buf.push(Pending(rank, payload))
    while (msg := buf.next_message(3)) is not None:
        published.extend(msg.events)
    got = RefIndex().apply_all(published).state()
    for rank in (0, 1):
        fresh = Converter(1, 16)
        want_events = fresh.clear(rank) + [e for p in taken_payloads[rank] for e in fresh.convert(rank, decode_batch(p).events)]
        want = RefIndex().apply_all(want_events).state()
        assert {k: v for k, v in got.items() if k[1] == rank} == {k: v for k, v in want.items() if k[1] == rank}
    clears = [e for e in published if e.kind == "cleared"]
    assert len(clears) == buf.overflows


def test_a_converter_error_clears_the_rank_instead_of_stopping_the_publisher(monkeypatch):
    from services.relay.app import RelayApp

    from .helpers import relay_cfg

    app = RelayApp(relay_cfg("nats://127.0.0.1:1", 5557, None))
    eng = engine("map")

    def broken(rank: int, events: list) -> list[RouterEvent]:
        raise RuntimeError("bug")

    monkeypatch.setattr(app.converter, "convert", broken)
    out = app._convert(Pending(0, _stores_of(eng, 1)[0]))
    assert [e.kind for e in out] == ["cleared"] and app.invalid_batches == 1
    assert app._convert(Pending(0, b"\xc1")) == [] and app.invalid_batches == 2  # undecodable: skipped


def test_default_message_caps_keep_payloads_under_nats_max_payload():
    from schemas import codec
    from services.relay.settings import RelayConfig

    defaults = RelayConfig()
    cap_blocks, per_event = defaults.max_blocks_per_message, defaults.max_batch_blocks
    conv = Converter(2**53 - 1, 1, max_batch_blocks=per_event)
    top = 2**64 - 1
    events = []
    for i in range(cap_blocks // per_event):
        ev = BlockStored(list(range(top - per_event * (i + 1), top - per_event * i)), top - 7, list(range(per_event)), 1,
                         "GPU", None, None, None, None)
        events.append(ev)
    out = conv.convert(0, events)
    assert sum(len(e.event.data.stored.blocks) for e in out) == cap_blocks
    assert len(codec.encode_msgpack(out)) < 1024 * 1024
    assert len(codec.encode_json(out)) < 1024 * 1024
