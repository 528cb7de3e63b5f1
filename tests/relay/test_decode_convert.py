"""Pure relay core: tolerant decoding of both vLLM encodings, conversion rules, batching, ids, seq tracking."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from services.relay.publisher import OutBuffer, OutMessage
from services.relay.seqtrack import SeqTracker, SeqVerdict

from .fake_engine import EventBatch, FakeEngine

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
    )  # fmt: skip
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
    try:
        decode_batch(data)
    except BadBatch:
        pass


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
    assert stores(out) == [list(zip(hashes, VECTOR))]
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
                         "token_ids": TOKENS[:16], "block_size": 16, "cache_salt": "x"}]])  # fmt: skip
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


def test_refcount_dedup_of_repeated_stores_and_removes():
    eng, conv = engine("map"), Converter(1, 16)
    ev, digests = eng.stored(TOKENS, group_idx=0)
    ev_again, _ = eng.stored(TOKENS, group_idx=1)
    out = convert(conv, eng, [ev, ev_again])
    assert len(out) == 1 and conv.counts["dedup_stores"] == 1
    assert convert(conv, eng, [eng.removed(digests)]) == []  # count 2 → 1
    out = convert(conv, eng, [eng.removed(digests)])  # 1 → 0: forwarded
    assert [e.kind for e in out] == ["removed"]
    out = convert(conv, eng, [eng.removed(digests)])  # never seen now: forwarded unchanged
    assert [e.kind for e in out] == ["removed"]


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
        "device", "device", "host_pinned", "host_pinned", "disk", "disk", "disk", "external"]  # fmt: skip
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


def test_out_buffer_evicts_oldest_and_coalesces_one_subject_up_to_the_cap():
    conv = Converter(1, 16)

    def msg(rank: int, n: int) -> OutMessage:
        return OutMessage(f"s.{rank}", rank, [conv.clear(rank)[0] for _ in range(n)], 0)

    buf = OutBuffer(3)
    for m in (msg(0, 1), msg(0, 2), msg(1, 1)):
        assert buf.make_room() == []
        buf.push(m)
    dropped = buf.make_room()
    assert [(d.dp_rank, len(d.events)) for d in dropped] == [(0, 1)]
    buf.push(msg(0, 1))
    buf.push(msg(0, 1))
    taken = buf.take(max_events=10)
    assert [(m.dp_rank, len(m.events)) for m in taken] == [(0, 2)]  # the next message is another rank
    assert [(m.dp_rank, len(m.events)) for m in buf.take(10)] == [(1, 1)]
    assert [len(m.events) for m in buf.take(1)] == [1]  # cap reached: one message even if more would fit the subject
    assert len(buf) == 1


def test_default_message_caps_keep_payloads_under_nats_max_payload():
    from schemas import codec
    from services.relay.settings import SETTINGS

    defaults = {s.name: s.default for s in SETTINGS}
    cap_blocks, per_event = defaults["max_blocks_per_message"], defaults["max_batch_blocks"]
    conv = Converter(2**53 - 1, 1, max_batch_blocks=per_event)
    top = 2**64 - 1
    events = []
    for i in range(cap_blocks // per_event):
        ev = BlockStored(list(range(top - per_event * (i + 1), top - per_event * i)), top - 7, list(range(per_event)), 1,
                         "GPU", None, None, None, None)  # fmt: skip
        events.append(ev)
    out = conv.convert(0, events)
    assert sum(len(e.event.data.stored.blocks) for e in out) == cap_blocks
    assert len(codec.encode_msgpack(out)) < 1024 * 1024
    assert len(codec.encode_json(out)) < 1024 * 1024
