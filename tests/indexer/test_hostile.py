"""The indexer against hostile or unlucky input on a real nats-server: events bound to their subject,
workers not in discovery (held, released, backfilled from the stream), caps from the record, a
failing snapshot store, readiness only once a large backlog is applied."""

from __future__ import annotations

import asyncio

import msgspec
import structlog

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import cleared_event, stored_event
from services.indexer import metrics as m
from services.runtime.workers import put_worker

from .conftest import NAMES, publish, register, wait_for


def chain(worker: int, start: int, n: int) -> list:
    return [(worker * 10**6 + start + i, start + i) for i in range(n)]


async def test_events_must_match_their_subject(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    mismatch, bad_subject = m.MESSAGES.labels("p", "subject_mismatch"), m.MESSAGES.labels("p", "bad_subject")
    before = (mismatch.value, bad_subject.value)
    for w in (800, 801):
        await register(js, "p", w)
    # worker 800's event on worker 801's subject, a batch mixing workers, a wrong dp rank, a bad subject
    wrong = [
        (NAMES.kv_subject("p", 801, 0), codec.encode_json(stored_event(800, 0, chain(800, 1, 2)))),
        (NAMES.kv_subject("p", 800, 0), codec.encode_json([stored_event(800, 0, chain(800, 1, 2)), cleared_event(801, 0)])),
        (NAMES.kv_subject("p", 800, 1), codec.encode_json(stored_event(800, 0, chain(800, 1, 2)))),
        ("kvr.p.kv.0800.0", codec.encode_json(stored_event(800, 0, chain(800, 1, 2)))),
        ("kvr.p.kv.800", codec.encode_json(stored_event(800, 0, chain(800, 1, 2)))),
    ]
    for subject, data in wrong:
        await js.publish(subject, data)
    seq = await publish(js, "p", stored_event(801, 0, chain(801, 1, 1)))
    await wait_for(lambda: app.applied_seq >= seq)
    assert app.index("p").tree_sizes() == {(801, 0): 1}  # nothing of the refused messages was applied
    st = app.pool_states()["p"]
    assert st.malformed == len(wrong)
    assert (mismatch.value - before[0], bad_subject.value - before[1]) == (3, 2)
    metrics = __import__("prometheus_client").generate_latest().decode()
    assert 'kvr_malformed_messages_total{reason="subject_mismatch",stream="KVR_KV"}' in metrics


async def test_unknown_workers_are_held_then_applied_in_order_when_they_register(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer()
    seqs = [
        await publish(js, "p", stored_event(5, 0, chain(5, 1, 3)), register_worker=False),
        await publish(js, "p", stored_event(5, 1, chain(5, 4, 2), parent_hash=5 * 10**6 + 3), register_worker=False),
        await publish(js, "p", stored_event(6, 0, chain(6, 1, 1)), register_worker=False),  # never registers
    ]
    await wait_for(lambda: app.applied_seq >= seqs[-1])
    assert app.index("p").tree_sizes() == {}
    adm = app.admission.pools["p"]
    assert len(adm.held) == 3 and adm.first_seq == {5: seqs[0], 6: seqs[2]}
    assert app.ready()  # waiting for a record is not lag
    await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=5, pool="p", total_kv_blocks=100, ttl_s=3600))
    await wait_for(lambda: (5, 0) in app.index("p").tree_sizes())
    assert app.index("p").tree_sizes() == {(5, 0): 5}  # both, in order (the second's parent is in the first)
    assert app.index("p").counters[("stored", "parent_not_found")] == 0
    assert len(adm.held) == 1 and 5 not in adm.first_seq
    seq = await publish(js, "p", stored_event(5, 2, chain(5, 6, 1), parent_hash=5 * 10**6 + 5))
    await wait_for(lambda: app.applied_seq >= seq)
    assert app.index("p").tree_sizes() == {(5, 0): 6}


async def test_a_spilled_worker_is_backfilled_from_the_stream_and_replicas_agree(nc, start_indexer):
    """The buffer holds ~2 messages: a worker that published 30 before registering is read again from
    the stream. A replica started afterwards applies the same 30 directly; both end identical."""
    js = nc.jetstream()
    live = await start_indexer(unknown_worker_buffer_bytes=2_500)
    await register(js, "p", 1)
    parent = None
    for i in range(30):
        await publish(js, "p", stored_event(7, i, chain(7, 10 * i, 10), parent_hash=parent), register_worker=False)
        parent = 7 * 10**6 + 10 * i + 9
        await publish(js, "p", stored_event(1, i, [(10**6 + i, 10**5 + i)]))
    seq = await publish(js, "p", stored_event(8, 0, chain(8, 1, 1)), register_worker=False)
    await wait_for(lambda: live.applied_seq >= seq)
    assert 7 in live.admission.pools["p"].spilled
    await register(js, "p", 7)
    await wait_for(lambda: live.index("p").tree_sizes().get((7, 0)) == 300)
    assert live.admission.pools["p"].counts.get("rewinds") == 1
    assert live.index("p").tree_sizes() == {(1, 0): 30, (7, 0): 300}
    late = await start_indexer(unknown_worker_buffer_bytes=2_500)
    assert late.dump("p").events == live.dump("p").events
    # the replica that re-read the stream for worker 7 applied worker 1's messages once
    assert sum(live.index("p").counters.values()) == 60


async def test_caps_from_the_record_refuse_and_count_overflow(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer(worker_blocks_headroom=1.0)
    await register(js, "p", 3, total_kv_blocks=8)
    await publish(js, "p", stored_event(3, 0, chain(3, 1, 6)))
    seq = await publish(js, "p", stored_event(3, 1, chain(3, 7, 4), parent_hash=3 * 10**6 + 6))
    await wait_for(lambda: app.applied_seq >= seq)
    assert app.index("p").tree_sizes() == {(3, 0): 6}
    assert app.index("p").counters[("stored", "over_capacity")] == 1
    assert m.DROPPED_EVENTS.labels("p", "over_capacity")._value.get() >= 1


async def test_a_flood_from_unregistered_workers_stays_within_the_buffer(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer(unknown_worker_buffer_bytes=64_000, unknown_workers_tracked=100)
    payloads = []
    for w in range(1000, 1300):
        payloads.append(js.publish(NAMES.kv_subject("p", w, 0), codec.encode_json(stored_event(w, 0, chain(w, 1, 20)))))
    acks = await asyncio.gather(*payloads)
    await wait_for(lambda: app.applied_seq >= max(a.seq for a in acks))
    adm = app.admission.pools["p"]
    assert adm.held_bytes <= 64_000 and len(adm.first_seq) == 100 and adm.floor is not None
    assert app.index("p").blocks == 0
    status = app.status()["pools"]["p"]["unknown_workers"]
    assert status["tracked"] == 100 and status["forgotten_workers"] == 200
    # a flooding id that registers after all: probed from the floor, backfilled, same as a fresh replica
    await register(js, "p", 1000)
    await wait_for(lambda: app.index("p").tree_sizes().get((1000, 0)) == 20)
    late = await start_indexer()
    assert late.dump("p").events == app.dump("p").events


async def test_a_failing_snapshot_is_counted_logged_and_retried(nc, start_indexer):
    js = nc.jetstream()
    app = await start_indexer(snapshot_every_events=1, snapshot_interval_s=0)
    await js.delete_object_store(NAMES.snapshots_bucket)
    before = m.SNAPSHOTS.labels("p", "error")._value.get()
    # capture_logs, not capsys: the log's stream is bound when logging is configured, perhaps by an
    # earlier test in this pytest worker, so output capture may never see the line
    with structlog.testing.capture_logs() as logs:
        seq = await publish(js, "p", stored_event(1, 0, chain(1, 1, 2)))
        await wait_for(lambda: m.SNAPSHOTS.labels("p", "error")._value.get() > before)
        assert app.pool_states()["p"].snapshot_failures >= 1
        await wait_for(lambda: any(e["event"] == "snapshot.failed" for e in logs))
    await js.create_object_store(NAMES.snapshots_bucket)
    await wait_for(lambda: app.pool_states()["p"].snapshot_seq >= seq, timeout=10)
    assert app.pool_states()["p"].snapshot_failures == 0
    obj = await (await js.object_store(NAMES.snapshots_bucket)).get("p.index")
    assert msgspec.msgpack.decode(obj.data)["admission"]["admitted"] == [1]


async def test_ready_only_once_a_backlog_of_large_messages_is_applied_and_not_while_disconnected(nats_server, nc):
    """Short version of the backlog goal (bench/hostile_input.py --only backlog runs 200 × 8,192)."""
    from services.indexer.app import IndexerApp
    from services.runtime.natsio import StreamSettings, provision
    from services.runtime.service import Runtime

    from .conftest import make_cfg

    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    for w in range(4):
        await register(js, "p", w, total_kv_blocks=10**6)
    last = 0
    for i in range(24):
        w = i % 4
        blocks = [(w * 10**9 + i * 8192 + b, i * 8192 + b) for b in range(8192)]
        last = (await js.publish(NAMES.kv_subject("p", w, 0), codec.encode_msgpack(stored_event(w, i // 4, blocks)),
                                 headers={codec.CONTENT_TYPE_HEADER: codec.MSGPACK})).seq
    cfg = make_cfg(pool=["p"], snapshot_every_events=0, snapshot_interval_s=0, max_ready_lag_s=5.0)
    app = IndexerApp(cfg)
    await app.start(Runtime("indexer", cfg, nc))
    try:
        early = []
        while not app.ready():
            early.append(app.applied_seq)
            await asyncio.sleep(0.005)
        assert app.applied_seq == last and app.index("p").blocks == 24 * 8192
        assert len(early) > 1  # observed not ready while it was applying
        assert app.follower is not None and app.follower.resets == 0

        nats_server.stop()
        await wait_for(lambda: not nc.is_connected, 10)
        assert not app.ready()
        nats_server.start()
        await wait_for(lambda: nc.is_connected, 15)
        await wait_for(app.ready, 15)
    finally:
        await app.stop()
