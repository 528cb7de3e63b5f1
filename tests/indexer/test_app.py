"""The indexer adapter against a real nats-server: match table, discovery removal, malformed input."""

from __future__ import annotations

import msgspec
import pytest
from nats.errors import NoRespondersError

from schemas import RemoteError, codec
from schemas.api import DumpReply, DumpRequest, MatchReply, MatchRequest
from schemas.discovery import WorkerRecord
from schemas.events import cleared_event, removed_event, stored_event
from schemas.hashing import local_block_hashes
from services.indexer import metrics as m
from services.runtime.responder import request
from services.runtime.workers import delete_worker, put_worker

from .conftest import NAMES, publish, wait_for


def chain(prefix: int, locals_: list[int]) -> list[tuple[int, int]]:
    """(engine hash, local hash) pairs; engine hashes are per worker so they differ across workers."""
    return [(prefix * 1000 + i, t) for i, t in enumerate(locals_)]


async def scores_of(nc, hashes: list[int], pool: str = "p") -> dict[tuple[int, int], int]:
    reply = await request(nc, NAMES.match(pool), MatchRequest(block_hashes=hashes), MatchReply)
    return {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}


async def test_match_table_over_nats(nc, start_indexer):
    app = await start_indexer()
    js = nc.jetstream()
    q = [1, 2, 3, 4]
    # (worker, dp) → events; expectations for q and for the branch [1, 2, 9]
    await publish(js, "p", stored_event(1, 0, chain(10, [1, 2, 3, 4])))  # full chain
    await publish(js, "p", stored_event(1, 0, chain(11, [1, 2]), dp_rank=1), msgpack=True)  # other dp rank
    await publish(js, "p", [stored_event(2, 0, chain(20, [1, 2])), stored_event(2, 1, [(20_009, 9)], parent_hash=20_001)])  # branch
    await publish(js, "p", [stored_event(3, 0, chain(30, [1, 2, 3])), removed_event(3, 1, [30_000])])  # middle only
    await publish(js, "p", stored_event(4, 0, [(40_002, 2), (40_003, 3)], parent_hash=99_999))  # unknown parent
    await publish(js, "p", [stored_event(5, 0, chain(50, [1, 2, 3, 4])), removed_event(5, 1, [50_001])])  # middle removed
    await publish(js, "p", [stored_event(6, 0, chain(60, [1, 2, 3])), cleared_event(6, 1)])  # cleared
    await publish(js, "p", stored_event(6, 0, chain(61, [1]), dp_rank=1))  # clear is per dp rank
    seq = await publish(js, "p", removed_event(7, 0, [12345]))  # unknown block of an unknown worker
    await wait_for(lambda: app.applied_seq >= seq)

    assert await scores_of(nc, q) == {(1, 0): 4, (1, 1): 2, (2, 0): 2, (5, 0): 1, (6, 1): 1}
    assert await scores_of(nc, [1, 2, 9]) == {(1, 0): 2, (1, 1): 2, (2, 0): 3, (5, 0): 1, (6, 1): 1}
    assert await scores_of(nc, [2, 3]) == {}  # worker 3 holds blocks 2-3, but not as a leading prefix
    assert await scores_of(nc, [7]) == {}
    reply = await request(nc, NAMES.match("p"), MatchRequest(block_hashes=q), MatchReply, msgpack=True)
    assert {(s.worker_id, s.dp_rank): s.blocks for s in reply.tree_sizes} == {
        (1, 0): 4, (1, 1): 2, (2, 0): 3, (3, 0): 2, (5, 0): 3, (6, 1): 1,
    }
    assert reply.block_size == 16 and reply.stream_seq == seq
    assert set(reply.tier_scores) == {"host_pinned", "disk"}
    counters = app.index("p").counters
    assert counters[("stored", "parent_not_found")] == 1
    assert counters[("removed", "block_not_found")] == 1
    assert counters[("cleared", "ok")] == 1

    # duplicates (repeated or stale event ids) are dropped; forward jumps are applied and counted
    retry = await js.publish(NAMES.kv_subject("p", 1, 0), b"{}", headers={"Nats-Msg-Id": "p:1:0:0"})
    assert retry.duplicate  # a publisher's retry never reaches the index
    dup = await js.publish(NAMES.kv_subject("p", 1, 0), codec.encode(stored_event(1, 0, [(10_901, 8)])))
    gap = await js.publish(NAMES.kv_subject("p", 1, 0), codec.encode(stored_event(1, 5, [(10_902, 8)])))
    await wait_for(lambda: app.applied_seq >= gap.seq)
    assert dup.seq < gap.seq
    assert counters[("stored", "duplicate")] == 1
    assert counters[("stored", "gap")] == 1 and app.index("p").gaps == 1
    assert await scores_of(nc, [8]) == {(1, 0): 1}

    # host tier: counted beyond the device prefix
    last = await publish(js, "p", stored_event(5, 2, [(50_101, 2), (50_102, 3)], parent_hash=50_000, storage_tier="host_pinned"))
    await wait_for(lambda: app.applied_seq >= last)
    reply = await request(nc, NAMES.match("p"), MatchRequest(block_hashes=q), MatchReply)
    assert {(s.worker_id, s.dp_rank): s.blocks for s in reply.tier_scores["host_pinned"]} == {(5, 0): 3}
    assert {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}[(5, 0)] == 1

    dump = await request(nc, NAMES.dump("p"), DumpRequest(), DumpReply)
    assert dump.stream_seq == last
    assert len(dump.events) >= app.index("p").blocks


async def test_token_ids_use_block_size_from_discovery(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=1, pool="p", block_size=4, ttl_s=3600))
    await wait_for(lambda: app.block_size("p") == 4)
    tokens = list(range(1, 14))  # 3 full blocks of 4 + a partial one
    local = local_block_hashes(tokens, 4)
    seq = await publish(js, "p", stored_event(1, 0, [(900 + i, h) for i, h in enumerate(local[:2])]))
    await wait_for(lambda: app.applied_seq >= seq)
    reply = await request(nc, NAMES.match("p"), MatchRequest(token_ids=tokens), MatchReply)
    assert reply.block_size == 4
    assert [(s.worker_id, s.blocks) for s in reply.scores] == [(1, 2)]
    salted = await request(nc, NAMES.match("p"), MatchRequest(token_ids=tokens, lora_name="a"), MatchReply)
    assert salted.scores == []
    # unknown pool and bad requests get structured errors
    msg = await nc.request(NAMES.match("p"), b'{"block_hashes": [1], "token_ids": [1]}', timeout=2)
    assert msgspec.json.decode(msg.data)["error"]["code"] == "invalid_request"
    with pytest.raises(Exception) as err:
        app.match("nope", MatchRequest(block_hashes=[1]))
    assert getattr(err.value, "code", None) == "not_found"


async def test_deleting_discovery_key_removes_worker_blocks(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    for wid in (1, 2):
        await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=wid, pool="p", dp_size=2, ttl_s=3600))
    await publish(js, "p", stored_event(1, 0, chain(10, [1, 2])))
    await publish(js, "p", stored_event(1, 0, chain(11, [1, 2]), dp_rank=1))
    seq = await publish(js, "p", stored_event(2, 0, chain(20, [1])))
    await wait_for(lambda: app.applied_seq >= seq)
    assert await scores_of(nc, [1, 2]) == {(1, 0): 2, (1, 1): 2, (2, 0): 1}
    await delete_worker(nc, NAMES.workers_bucket, "p", 1)
    await wait_for(lambda: (1, 0) not in app.index("p").tree_sizes())
    assert await scores_of(nc, [1, 2]) == {(2, 0): 1}
    assert app.index("p").worker_keys() == [(2, 0)]
    # A zombie's events are ignored until the worker is put again ...
    seq = await publish(js, "p", stored_event(1, 5, chain(12, [1])), register_worker=False)
    await wait_for(lambda: app.applied_seq >= seq)
    assert await scores_of(nc, [1]) == {(2, 0): 1}
    assert app.pool_states()["p"].dropped == 1
    # ... and a re-registered worker's events are applied once the put has been seen.
    await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=1, pool="p", ttl_s=3600))
    await wait_for(lambda: 1 not in app.admission.pools["p"].removed)
    seq = await publish(js, "p", stored_event(1, 7, chain(13, [1])))  # a new instance: any first event id
    await wait_for(lambda: app.applied_seq >= seq)
    assert await scores_of(nc, [1]) == {(1, 0): 1, (2, 0): 1}
    assert app.pool_states()["p"].dropped == 1


async def test_malformed_payloads_are_counted_and_skipped(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    subject = NAMES.kv_subject("p", 1, 0)
    mp = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK}
    huge = msgspec.msgpack.encode({"worker_id": 1, "event": {"event_id": 9, "data": {"removed": {"block_hashes": [0] * 1_000_000}}}})
    bad = [
        (b"{not json", None),
        (b"\xc1\xff", mp),  # invalid msgpack
        (b'{"worker_id": "one", "event": {"event_id": 1, "data": "cleared"}}', None),  # wrong type
        (b'{"worker_id": 1, "event": {"event_id": -1, "data": "cleared"}}', None),  # negative id
        (b'{"worker_id": 1, "event": {"event_id": 1, "data": {"removed": {"block_hashes": [-99999999999999999999]}}}}', None),
        (b'{"worker_id": 1, "event": {"event_id": 1, "data": {"stored": {"blocks": [{"block_hash": 1, "tokens_hash": 18446744073709551616}]}}}}', None),
        (huge, mp),  # 10^6-element array
        (msgspec.msgpack.encode([0] * 1_000_000), mp),
        (b'{"worker_id": 1, "event": {"event_id": 1, "data": {"stored": null, "removed": null}}}', None),
    ]
    await publish(js, "p", stored_event(1, 0, chain(10, [1])))
    for data, headers in bad:
        await js.publish(subject, data, headers=headers)
    # i64-negative hashes from signed publishers are reinterpreted (docs/protocol.md §0), not rejected
    signed = b'{"worker_id": 1, "event": {"event_id": 1, "data": {"stored": {"parent_hash": 10000, "blocks": [{"block_hash": -5, "tokens_hash": -2}]}}}}'
    await js.publish(subject, signed)
    seq = await publish(js, "p", stored_event(1, 2, [(10_002, 3)], parent_hash=(1 << 64) - 5))
    await wait_for(lambda: app.applied_seq >= seq)
    assert app.pool_states()["p"].malformed == len(bad)
    assert await scores_of(nc, [1, (1 << 64) - 2, 3]) == {(1, 0): 3}
    assert app.index("p").gaps == 0
    metrics = app.status()["pools"]["p"]
    assert metrics["malformed_messages"] == len(bad)


async def test_snapshot_restore_and_loud_history_loss(nc, start_indexer):
    js = nc.jetstream()
    first = await start_indexer(snapshot_every_events=1, snapshot_interval_s=0)
    for i in range(5):
        seq = await publish(js, "p", stored_event(1, i, [(100 + i, 10 + i)], parent_hash=(99 + i) if i else None))
    await wait_for(lambda: first.pool_states()["p"].snapshot_seq >= seq)
    covered = first.pool_states()["p"].snapshot_seq
    want = first.dump("p").events
    await first.stop()

    # a restart with the stream intact: snapshot + nothing to replay
    again = await start_indexer()
    assert again.pool_states()["p"].restored_seq == covered
    assert again.dump("p").events == want and again.pool_states()["p"].history_lost == 0
    await again.stop()

    # the stream drops events newer than the snapshot (as max_age would): reported, rebuilt from what exists
    for i in range(5, 9):
        last = await publish(js, "p", stored_event(1, i, [(100 + i, 10 + i)], parent_hash=99 + i))
    await js.purge_stream(NAMES.kv_stream, seq=last)  # keeps only the newest message
    before = m.HISTORY_LOST.labels("p")._value.get()
    late = await start_indexer()
    st = late.pool_states()["p"]
    assert st.history_lost == last - 1 - covered
    assert m.HISTORY_LOST.labels("p")._value.get() == before + 1
    assert late.applied_seq == last
    # blocks 5-7 were lost, so block 8's parent is unknown: the index holds the snapshot's chain only
    assert late.index("p").counters[("stored", "parent_not_found")] == 1
    assert await scores_of(nc, [10, 11, 12, 13, 14, 15]) == {(1, 0): 5}


async def test_dump_larger_than_max_payload_is_a_structured_error(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    for w in range(160):
        seq = await publish(js, "p", stored_event(w, 0, chain(w + 1, list(range(1, 65)))))
    await wait_for(lambda: app.applied_seq >= seq)
    with pytest.raises(RemoteError) as err:
        await request(nc, NAMES.dump("p"), DumpRequest(), DumpReply, timeout=10)
    assert err.value.code == "overloaded" and "max_payload" in err.value.message
    assert len(app.dump("p").events) == 160 * 64  # in-process dumps have no size limit


async def test_one_indexer_serves_several_pools_in_isolation(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer(pool=["p", "q"])
    await publish(js, "p", stored_event(1, 0, chain(10, [1, 2])))
    await publish(js, "q", stored_event(1, 0, chain(10, [1])))
    seq = await publish(js, "other", stored_event(9, 0, chain(90, [1, 2, 3])))  # a pool nobody serves here
    last = await publish(js, "q", stored_event(2, 0, chain(20, [1, 2, 3])))
    await wait_for(lambda: app.applied_seq >= last)
    assert seq < last
    assert await scores_of(nc, [1, 2, 3], "p") == {(1, 0): 2}
    assert await scores_of(nc, [1, 2, 3], "q") == {(1, 0): 1, (2, 0): 3}
    with pytest.raises(NoRespondersError):  # pool "other" is not served here
        await request(nc, NAMES.match("other"), MatchRequest(block_hashes=[1]), MatchReply, timeout=1)


async def test_snapshot_is_serialised_in_pieces_while_matches_are_answered_and_changes_wait(nc, start_indexer, monkeypatch):
    """A large index is serialised between event-loop turns: matches keep being answered, but no KV
    event or discovery change touches the index until the state (and its stream sequence) is taken;
    then both are applied, in order."""
    import asyncio

    from services.indexer import snapshot

    monkeypatch.setattr(snapshot, "PIECE", 100)  # hundreds of pieces, so matches surely interleave
    js = nc.jetstream()
    app = await start_indexer(snapshot_every_events=0, snapshot_interval_s=0)  # snapshots only when asked
    for wid in (1, 2):
        await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=wid, pool="p", ttl_s=3600))
    seq = await publish(js, "p", stored_event(1, 0, chain(10, [1, 2, 3])))
    await wait_for(lambda: app.applied_seq >= seq and 2 not in app.admission.pools["p"].removed)
    index = app.index("p")
    for c in range(20):  # 20,000 more nodes, straight into the index
        index.apply(stored_event(2, c, [(10**6 * (c + 1) + i, 10**6 * (c + 1) + i) for i in range(1000)]))
    want = app.dump("p").events
    st = app.pool_states()["p"]
    assert app.index("p").tree_sizes() == {(1, 0): 3, (2, 0): 20_000}

    writing = asyncio.create_task(app.replica._write_snapshot(st))
    await asyncio.sleep(0)  # the snapshot has started: follower paused, discovery changes held
    assert app.replica._held_discovery is not None
    later = await publish(js, "p", stored_event(1, 1, [(10003, 4)], parent_hash=10002))
    await delete_worker(nc, NAMES.workers_bucket, "p", 2)
    answered = 0
    while True:
        scores = await scores_of(nc, [1, 2, 3, 4])
        if app.replica._held_discovery is None:
            break  # serialisation ended during that round trip
        # still serialising, so it was when the match was answered: nothing new applied yet
        assert scores == {(1, 0): 3} and app.applied_seq == seq
        assert (2, 0) in app.index("p").tree_sizes()
        answered += 1
    assert answered > 0
    await writing

    stored = await snapshot.load(js, NAMES.snapshots_bucket, NAMES.snapshot_object("p"))
    assert stored is not None and stored.stream_seq == seq and stored.index.dump() == want
    await wait_for(lambda: app.applied_seq >= later and (2, 0) not in app.index("p").tree_sizes())
    assert await scores_of(nc, [1, 2, 3, 4]) == {(1, 0): 4}
