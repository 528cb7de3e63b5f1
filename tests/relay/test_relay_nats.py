"""The relay between a fake vLLM engine (real ZMQ sockets) and a real nats-server."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from bench.lib.fake_engine import BlockPoolSim, FakeEngine
from bench.lib.refindex import RefIndex
from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from schemas.subjects import Names
from services.indexer.index import PrefixIndex
from services.relay.app import worker_id_for
from services.relay.convert import Converter
from services.relay.decode import decode_batch
from services.runtime.kv_publisher import Pending
from services.runtime.natsio import StreamSettings, provision

from .helpers import (
    metric,
    ports,
    read_kv,
    relay_cfg,
    start_relay,
    wait_for,
    wait_kv,
)

P1 = list(range(1, 65))  # 4 blocks
P2 = P1[:32] + list(range(1000, 1032))  # shares 2 blocks with P1
P3 = list(range(5000, 5032))  # 2 blocks, under a LoRA adapter
WID = worker_id_for("vllm-0")


def offline(batches: list[bytes], *, clear_first: bool = True) -> list[RouterEvent]:
    """What a relay that lost nothing would publish for these engine batches."""
    conv = Converter(WID, 16)
    out = conv.clear(0) if clear_first else []
    for payload in batches:
        out += conv.convert(0, decode_batch(payload).events)
    return out


@pytest.mark.parametrize("encoding", ["legacy", "map"])
async def test_engine_events_land_in_kvr_kv_and_match_prompts(nats_url, nc, encoding):
    zp, rp = ports()
    topic = "kv@10.0.0.7@m"
    eng = FakeEngine(zp, rp, encoding=encoding, topic=topic).start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp, "--topic", topic))
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        s1, d1 = eng.stored(P1)
        s2, _ = eng.stored(P2[32:], parent=d1[1])
        s3, _ = eng.stored(P3, lora_name="adapter-a")
        await eng.publish([s1])
        await eng.publish([s2, s3])
        await eng.publish([eng.removed(d1[3:])])
        events = await wait_kv(js, 5)
        assert [e.kind for e in events] == ["cleared", "stored", "stored", "stored", "removed"]
        assert [e.event.event_id for e in events] == [1, 2, 3, 4, 5]
        assert {e.worker_id for e in events} == {WID} and {e.event.dp_rank for e in events} == {0}
        assert events[2].event.data.stored.parent_hash == events[1].event.data.stored.blocks[1].block_hash
        index = RefIndex().apply_all(events)
        assert index.match(P1) == {(WID, 0): 3}  # block 4 was removed
        assert index.match(P2) == {(WID, 0): 4}
        assert index.match(P3) == {(WID, 0): 0}  # hashed with the adapter's seed
        assert index.match(P3, lora="adapter-a") == {(WID, 0): 2}

        msgs = await read_kv(js)
        first_ids = {h["Nats-Msg-Id"] for h, _ in msgs}
        epoch = relay.app.publisher.epoch
        assert f"p:{WID}:0:{epoch}:1" in first_ids and all(h["Content-Type"] == codec.MSGPACK for h, _ in msgs)
        info = await js.stream_info("KVR_KV")
        subjects = {(await js.get_msg("KVR_KV", s)).subject for s in range(1, info.state.last_seq + 1)}
        assert subjects == {f"kvr.p.kv.{WID}.0"}

        await eng.publish([eng.cleared()])
        events = await wait_kv(js, 6)
        assert events[-1].kind == "cleared" and events[-1].event.event_id == 6
        assert RefIndex().apply_all(events).match(P1) == {(WID, 0): 0}

        kv = await js.key_value("KVR_WORKERS")
        record = codec.decode((await kv.get(f"p.{WID}")).value, WorkerRecord)
        assert (record.pod_name, record.address, record.port, record.block_size) == ("vllm-0", "10.0.0.7", 8000, 16)
    finally:
        await relay.stop()
        await eng.close()


@pytest.mark.parametrize("replay_with_topic", [True, False])
async def test_dropped_pub_messages_are_replayed_and_index_matches_a_lossless_run(nats_url, nc, replay_with_topic):
    zp, rp = ports()
    eng = FakeEngine(zp, rp, encoding="map", replay_with_topic=replay_with_topic).start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp))
    gaps, replayed = metric("kvr_relay_seq_gaps_total", dp_rank="0"), metric("kvr_relay_replayed_batches_total", dp_rank="0")
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        parent = None
        sent: list[bytes] = []
        for i in range(12):
            ev, digests = eng.stored(list(range(i * 100, i * 100 + 32)), parent=parent)
            events = [ev] if i % 4 != 3 else [ev, eng.removed(digests[-1:])]
            parent = digests[0] if i % 4 == 3 else digests[-1]
            if i == 4:
                eng.drop_next = 3  # batches 4, 5, 6 never reach the relay live
            await eng.publish(events)
            sent.append(eng.buffer[-1][1])
        expected = offline(sent)
        events = await wait_kv(js, len(expected))
        assert eng.replay_requests == [4]
        assert metric("kvr_relay_seq_gaps_total", dp_rank="0") - gaps == 1
        assert metric("kvr_relay_replayed_batches_total", dp_rank="0") - replayed >= 3
        assert [e.event.event_id for e in events] == list(range(1, len(expected) + 1))
        got, want = RefIndex().apply_all(events), RefIndex().apply_all(expected)
        assert got.state() == want.state() and got.skipped_stores == 0
    finally:
        await relay.stop()
        await eng.close()


async def test_engine_restart_publishes_cleared_and_index_follows_the_new_engine(nats_url, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp, encoding="legacy").start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp))
    restarts = metric("kvr_relay_engine_restarts_total", dp_rank="0")
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        for tokens in (P1, P2, P3):
            await eng.publish([eng.stored(tokens)[0]])
        await wait_kv(js, 4)
        eng.restart_numbering()  # seq back to 0, cache empty
        new = [await eng.publish([eng.stored(list(range(7000, 7048)))[0]]) for _ in range(1)]
        assert new == [0]
        events = await wait_kv(js, 6)
        assert [e.kind for e in events] == ["cleared", "stored", "stored", "stored", "cleared", "stored"]
        assert metric("kvr_relay_engine_restarts_total", dp_rank="0") - restarts == 1
        index = RefIndex().apply_all(events)
        assert index.match(P1) == {(WID, 0): 0}
        assert index.match(list(range(7000, 7048))) == {(WID, 0): 3}
    finally:
        await relay.stop()
        await eng.close()


async def test_unrecoverable_gap_publishes_cleared_and_continues(nats_url, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp, buffer_steps=2).start()  # replay keeps only the last 2 batches
    relay = await start_relay(relay_cfg(nats_url, zp, rp))
    lost = metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0")
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        await eng.publish([eng.stored(P1)[0]])
        eng.drop_next = 4
        for i in range(5):
            await eng.publish([eng.stored(list(range(i * 100, i * 100 + 16)))[0]])
        events = await wait_kv(js, 5)
        assert [e.kind for e in events] == ["cleared", "stored", "cleared", "stored", "stored"]
        assert metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0") - lost == 1
        index = RefIndex().apply_all(events)
        assert index.match(P1) == {(WID, 0): 0}  # stale state is gone
        assert index.match(list(range(400, 416))) == {(WID, 0): 1}  # the live batch
        assert index.match(list(range(300, 316))) == {(WID, 0): 1}  # still in the replay buffer
    finally:
        await relay.stop()
        await eng.close()


async def test_gap_without_replay_endpoint_publishes_cleared(nats_url, nc):
    zp, _ = ports()
    eng = FakeEngine(zp).start()
    relay = await start_relay(relay_cfg(nats_url, zp, None))
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        await eng.publish([eng.stored(P1)[0]])
        eng.drop_next = 1
        await eng.publish([eng.stored(P2)[0]])
        await eng.publish([eng.stored(P3)[0]])
        events = await wait_kv(js, 4)
        assert [e.kind for e in events] == ["cleared", "stored", "cleared", "stored"]
    finally:
        await relay.stop()
        await eng.close()


async def test_garbage_frames_are_counted_and_skipped(nats_url, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp).start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp))
    reasons = ["frames", "seq", "bad_msgpack", "bad_envelope", "bad_event", "unknown_event"]
    before = {r: metric("kvr_relay_invalid_total", reason=r) for r in reasons}
    gaps = metric("kvr_relay_seq_gaps_total", dp_rank="0")
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        await eng.publish([eng.stored(P1)[0]])
        await eng.send_raw([b"only-one-frame"])
        await eng.send_raw([b"", b"", b"", b"four"])
        await eng.send_raw([b"", b"123", b"payload"])
        await eng.publish_payload(b"\xc1\xc1\xc1")
        await eng.publish_payload(msgspec.msgpack.encode("not a batch"))
        await eng.publish_payload(msgspec.msgpack.encode([1.0, [["BlockStored", "x"], {"type": "Nope"}], 0]))
        await eng.publish([eng.stored(P3)[0]])
        events = await wait_kv(js, 3)
        assert [e.kind for e in events] == ["cleared", "stored", "stored"]
        after = {r: metric("kvr_relay_invalid_total", reason=r) - before[r] for r in reasons}
        assert after == {"frames": 2, "seq": 1, "bad_msgpack": 1, "bad_envelope": 1, "bad_event": 1, "unknown_event": 1}
        assert metric("kvr_relay_seq_gaps_total", dp_rank="0") == gaps  # bad payloads still advance seq
        assert relay.app.ready()
    finally:
        await relay.stop()
        await eng.close()


async def test_nats_restart_while_engine_publishes_loses_nothing(nats_server, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp).start()
    relay = await start_relay(relay_cfg(nats_server.url, zp, rp))
    js = nc.jetstream()
    n = 60
    try:
        await eng.wait_subscribed()

        async def produce() -> None:
            for i in range(n):
                await eng.publish([eng.stored(list(range(i * 16, i * 16 + 16)))[0]])
                await asyncio.sleep(0.01)

        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.15)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(0.3)  # the engine keeps publishing while NATS is down
        await asyncio.to_thread(nats_server.start)
        await producer
        assert relay.app.intakes[0].live_batches == n  # intake never waited on NATS
        await wait_for(lambda: relay.app.publisher.pending() == 0, 20, "publisher to drain")
        events = [ev for _, ev in await read_kv(js)]
        assert [e.event.event_id for e in events] == list(range(1, n + 2))  # no loss, no duplicate
        assert RefIndex().apply_all(events).match(list(range(16 * 30, 16 * 31))) == {(WID, 0): 1}
        assert relay.rt.nc.stats["reconnects"] >= 1  # the outage was real
    finally:
        await relay.stop()
        await eng.close()


def indexed(events: list[RouterEvent]) -> dict:
    """What the indexer holds after these events: the real `PrefixIndex`, read back through its dump."""
    index = PrefixIndex()
    index.apply_all(events)
    return RefIndex().apply_all(index.dump()).state()


async def test_nats_stall_under_a_burst_costs_one_cleared_and_the_index_equals_the_kept_batches(nats_server, nc):
    # The engine cycles 160 one-block prompts through a 128-block cache (each batch evicts one block
    # and stores one) while NATS is down: the buffer keeps the newest 200 batches, one cleared goes
    # ahead of them, and the index ends with exactly what those batches say, i.e. the 128 cached.
    zp, rp = ports()
    eng = FakeEngine(zp, rp, encoding="map").start()
    bound = 200
    relay = await start_relay(relay_cfg(nats_server.url, zp, rp, "--buffer-messages", str(bound), "--publish-timeout-s", "0.3"))
    buf = relay.app.publisher.buffer
    taken: list[Pending] = []
    convert = buf.convert

    def spy(item: Pending) -> list[RouterEvent]:
        taken.append(item)
        return convert(item)

    buf.convert = spy
    pool = BlockPoolSim(eng, 128)
    prompts = [list(range(i * 16, i * 16 + 16)) for i in range(160)]
    dropped = metric("kvr_relay_dropped_messages_total")
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        for tokens in prompts[:128]:  # the engine fills its cache before the stall
            await eng.publish(pool.request(tokens, full_report=True))
        await wait_for(lambda: relay.app.intakes[0].live_batches == 128, 10, "warm-up taken")
        await wait_for(lambda: relay.app.publisher.pending() == 0, 10, "warm-up published")
        await asyncio.to_thread(nats_server.stop)
        sent = []
        for i in range(1000):
            await eng.publish(pool.request(prompts[(128 + i) % 160], full_report=True))
            sent.append(eng.buffer[-1][1])
        await wait_for(lambda: relay.app.intakes[0].live_batches == 128 + 1000, 10, "intake to take every batch")
        assert len(buf) <= bound + 1  # the kept batches plus one pending clear
        await asyncio.to_thread(nats_server.start)
        await wait_for(lambda: relay.app.publisher.pending() == 0, 20, "publisher to drain")
        events = [ev for _, ev in await read_kv(js)]
        ids = [e.event.event_id for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        clears = [i for i, e in enumerate(events) if e.kind == "cleared"]
        assert len(clears) == 2  # the relay's start, then one for the whole overflow episode
        assert metric("kvr_relay_dropped_messages_total") - dropped > 700
        at = max(i for i, item in enumerate(taken) if item.payload is None)
        kept = [item.payload for item in taken[at + 1 :]]
        assert len(kept) == bound and kept == sent[-bound:]  # the newest batches, in order
        fresh = Converter(WID, 16)
        want = fresh.clear(0) + [e for p in kept for e in fresh.convert(0, decode_batch(p).events)]
        assert [(e.kind, e.event.data) for e in events[clears[-1] :]] == [(e.kind, e.event.data) for e in want]
        state = indexed(events)
        assert state == indexed(want)
        assert {h for _, h, _ in state[(WID, 0, "device")]} == pool.cached()  # all 128, none stale
    finally:
        await relay.stop()
        await eng.close()


async def test_vllm_full_report_mode_and_hybrid_groups_leave_no_stale_blocks(nats_url, nc):
    import random

    zp, rp = ports()
    eng = FakeEngine(zp, rp, encoding="map").start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp))
    rng = random.Random(3)
    pool = BlockPoolSim(eng, {0: 48, 1: 20}, groups=(0, 1))  # a full-attention and a smaller group
    prefixes = [[rng.randrange(1, 5000) for _ in range(16 * rng.randrange(1, 4))] for _ in range(20)]
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        for _ in range(200):
            tokens = rng.choice(prefixes) + [rng.randrange(1, 5000) for _ in range(16 * rng.randrange(0, 3))]
            await eng.publish(pool.request(tokens, full_report=rng.random() < 0.7))
        await wait_for(lambda: relay.app.intakes[0].live_batches == 200, 10, "intake to take every batch")
        await wait_for(lambda: relay.app.publisher.pending() == 0, 10, "publisher to drain")
        state = indexed([ev for _, ev in await read_kv(js)])
        held = {h for _, h, _ in state[(WID, 0, "device")]}
        assert held == pool.cached()  # 0 stale (evicted by every group but indexed), 0 missing
        assert metric("kvr_relay_convert_total", what="dedup_stores") > 0
    finally:
        await relay.stop()
        await eng.close()


async def test_event_ids_continue_across_relay_restarts(nats_url, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp).start()
    js = nc.jetstream()
    relay = await start_relay(relay_cfg(nats_url, zp, rp, "--id-reserve-step", "100"))
    try:
        await eng.wait_subscribed()
        for tokens in (P1, P2):
            await eng.publish([eng.stored(tokens)[0]])
        await wait_kv(js, 3)
    finally:
        await relay.stop()
    kv = await js.key_value("KVR_RELAY")
    ceiling = int((await kv.get(f"p.{WID}.0")).value)
    assert 100 < ceiling <= 103  # the first publish reserved its last id + step
    relay = await start_relay(relay_cfg(nats_url, zp, rp, "--id-reserve-step", "100"))
    try:
        await eng.wait_subscribed()
        await eng.publish([eng.stored(P3)[0]])
        events = await wait_kv(js, 5 + 2)
        ids = [e.event.event_id for e in events]
        assert ids[:3] == [1, 2, 3] and ids[3] == ceiling + 1  # restarted relay: cleared, replay from seq 0
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert [e.kind for e in events[3:]] == ["cleared", "stored", "stored", "stored"]
    finally:
        await relay.stop()
        await eng.close()


async def test_each_dp_rank_has_its_own_socket_subject_ids_and_restarts(nats_url, nc):
    z0, r0, z1, r1 = ports(4)
    e0 = FakeEngine(z0, r0, dp_rank=0).start()
    e1 = FakeEngine(z1, r1, dp_rank=1, encoding="map").start()
    cfg = relay_cfg(nats_url, z0, None, "--zmq", f"tcp://127.0.0.1:{z1}", "--dp-size", "2",
                    "--replay", f"tcp://127.0.0.1:{r0},tcp://127.0.0.1:{r1}")
    assert cfg.zmq == (f"tcp://127.0.0.1:{z0}", f"tcp://127.0.0.1:{z1}")
    relay = await start_relay(cfg)
    js = nc.jetstream()
    try:
        await e0.wait_subscribed()
        await e1.wait_subscribed()
        await e0.publish([e0.stored(P1)[0]])
        await e1.publish([e1.stored(P2)[0]])
        await e1.publish([e1.stored(P3)[0]])
        await wait_kv(js, 5)
        e1.restart_numbering()
        await e1.publish([e1.stored(P1)[0]])
        events = await wait_kv(js, 7)
        by_rank = {r: [(e.kind, e.event.event_id) for e in events if e.event.dp_rank == r] for r in (0, 1)}
        assert by_rank[0] == [("cleared", 1), ("stored", 2)]
        assert by_rank[1] == [("cleared", 1), ("stored", 2), ("stored", 3), ("cleared", 4), ("stored", 5)]
        index = RefIndex().apply_all(events)
        assert index.match(P1) == {(WID, 0): 4, (WID, 1): 4}
        assert index.match(P3) == {(WID, 0): 0, (WID, 1): 0}  # rank 1's old state was cleared
        subjects = {m.subject for m in [await js.get_msg("KVR_KV", s) for s in range(1, (await js.stream_info("KVR_KV")).state.last_seq + 1)]}
        assert subjects == {f"kvr.p.kv.{WID}.0", f"kvr.p.kv.{WID}.1"}
    finally:
        await relay.stop()
        await e0.close()
        await e1.close()


async def test_a_large_engine_batch_is_split_into_capped_messages(nats_url, nc):
    zp, rp = ports()
    eng = FakeEngine(zp, rp).start()
    relay = await start_relay(relay_cfg(nats_url, zp, rp, "--max-blocks-per-message", "40", "--max-batch-blocks", "16"))
    js = nc.jetstream()
    try:
        await eng.wait_subscribed()
        stores = [eng.stored(list(range(i * 1000, i * 1000 + 256)))[0] for i in range(10)]  # 10 × 16 blocks
        await eng.publish(stores)
        await wait_for(lambda: relay.app.publisher.published_events == 11, 10, "all events published")
        msgs = await read_kv(js)
        per_msg: dict[str, int] = {}
        for headers, ev in msgs:
            blocks = len(ev.event.data.stored.blocks) if ev.kind == "stored" else 0
            per_msg[headers["Nats-Msg-Id"]] = per_msg.get(headers["Nats-Msg-Id"], 0) + blocks
        assert max(per_msg.values()) <= 40 and sum(per_msg.values()) == 160 and len(per_msg) >= 4
        index = RefIndex().apply_all([ev for _, ev in msgs])
        assert index.match(list(range(9000, 9256))) == {(WID, 0): 16}
    finally:
        await relay.stop()
        await eng.close()


async def test_replay_timeout_becomes_cleared_and_the_intake_continues(nats_url, nc):
    import zmq
    import zmq.asyncio

    zp, rp = ports()
    eng = FakeEngine(zp).start()  # no replay server of its own
    ctx = zmq.asyncio.Context()
    relay = None
    try:
        silent = ctx.socket(zmq.ROUTER)  # accepts replay requests, never answers
        silent.setsockopt(zmq.LINGER, 0)
        silent.bind(f"tcp://127.0.0.1:{rp}")
        relay = await start_relay(relay_cfg(nats_url, zp, rp, "--replay-timeout-s", "0.3"))
        lost = metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0")
        js = nc.jetstream()
        await eng.wait_subscribed()
        await eng.publish([eng.stored(P1)[0]])
        eng.drop_next = 2
        for tokens in (P2, P3, list(range(9000, 9016)), list(range(9100, 9116))):
            await eng.publish([eng.stored(tokens)[0]])
        events = await wait_kv(js, 5)
        assert [e.kind for e in events] == ["cleared", "stored", "cleared", "stored", "stored"]
        assert metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0") - lost == 1
        assert len(await silent.recv_multipart()) == 3  # the request did arrive: [identity, b"", start]
    finally:
        if relay is not None:
            await relay.stop()
        await eng.close()
        ctx.destroy(linger=0)


async def test_a_failed_heartbeat_is_retried_at_once_not_an_interval_later(nats_url, nc):
    """The workers bucket cannot take the put (here: gone; in a cluster: electing a leader, found by
    tests/faults/). The relay tries again within HEARTBEAT_RETRY_S, not a whole ttl/3 later: two
    missed intervals plus a put timeout are a whole TTL, after which every replica expires the worker
    and drops its blocks."""
    zp, _ = ports()
    relay = await start_relay(relay_cfg(nats_url, zp, None, "--heartbeat-ttl-s", "18"))  # a beat every 6 s
    js = nc.jetstream()
    key = f"p.{relay.app.record.worker_id}"
    try:
        await (await js.key_value("KVR_WORKERS")).get(key)  # put at start
        failures = metric("kvr_relay_heartbeat_failures_total")
        await js.delete_key_value("KVR_WORKERS")
        await wait_for(lambda: metric("kvr_relay_heartbeat_failures_total") > failures, 10, "a failed heartbeat")
        await provision(js, Names(), StreamSettings())  # the bucket is back (empty)
        loop = asyncio.get_running_loop()
        back = loop.time()
        kv = await js.key_value("KVR_WORKERS")
        while True:
            try:
                await kv.get(key)
                break
            except Exception:  # noqa: BLE001 - not put again yet
                assert loop.time() - back < 3, "the heartbeat waited for its next interval (6 s)"
                await asyncio.sleep(0.05)
    finally:
        await relay.stop()
