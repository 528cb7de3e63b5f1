"""The runtime's KvEventPublisher as the mock fleet uses it, against a real server, and `kvr mock-workers` as a
process (ready, SIGTERM → 0)."""

from __future__ import annotations

import asyncio

import pytest

from schemas import RouterEvent, codec, removed_event, stored_event
from schemas.subjects import Names
from services.runtime.kv_publisher import KvEventPublisher
from services.runtime.natsio import StreamSettings, provision
from services.runtime.procs import ServiceProcess

NAMES = Names()


async def test_publisher_batches_with_msg_ids_and_checks_order(nc):
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    pub = KvEventPublisher(js, pool="pp", worker_id=9, subject_of=lambda r: NAMES.kv_subject("pp", 9, r), msgpack=False,
                           max_events=4, max_inflight=2, epoch=77)
    pub.start()
    events = [stored_event(9, i, [(1000 + i, 2000 + i)], parent_hash=(1000 + i - 1) if i else None) for i in range(10)]
    await pub.publish(events)
    assert await pub.flushed(5)
    assert (pub.published_messages, pub.published_events, pub.failures) == (3, 10, 0)

    sub = await js.pull_subscribe(NAMES.kv_subject("pp", 9, 0), stream="KVR_KV")
    msgs = await sub.fetch(10, timeout=2)
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == ["pp:9:0:77:0", "pp:9:0:77:4", "pp:9:0:77:8"]
    decoded = [codec.decode(m.data, list[RouterEvent]) for m in msgs]
    assert [len(d) for d in decoded] == [4, 4, 2]
    assert [e.event.event_id for d in decoded for e in d] == list(range(10))

    # a retried message (same Nats-Msg-Id) is stored once
    await js.publish(NAMES.kv_subject("pp", 9, 0), msgs[0].data, headers={"Nats-Msg-Id": "pp:9:0:77:0"})
    info = await js.stream_info("KVR_KV")
    assert info.state.messages == 3

    with pytest.raises(ValueError, match="not after"):
        await pub.publish([removed_event(9, 5, [1005])])
    with pytest.raises(ValueError, match="worker 8"):
        await pub.publish([removed_event(8, 50, [1])])
    await pub.stop()


async def test_publisher_rides_out_a_stream_without_a_leader(nc):
    """No stream answers the subject for 1.5 s ("no responders" at once, as while a cluster elects
    a new stream leader): every message is retried until the stream is back, nothing is given up."""
    js = nc.jetstream()
    pub = KvEventPublisher(js, pool="pp", worker_id=9, subject_of=lambda r: NAMES.kv_subject("pp", 9, r), max_events=1,
                           max_inflight=8)
    pub.start()
    events = [stored_event(9, i, [(1000 + i, 2000 + i)]) for i in range(6)]
    await pub.publish(events)
    await asyncio.sleep(1.5)
    assert pub.published_messages == 0 and pub.pending() == 6 and pub.failures > 0
    await provision(js, NAMES, StreamSettings())
    assert await pub.flushed(15)
    assert (pub.published_messages, pub.published_events, pub.pending()) == (6, 6, 0)
    assert (await js.stream_info("KVR_KV")).state.messages == 6
    await pub.stop()


async def test_mock_workers_process_registers_and_drains_on_sigterm(nats_url, nc, tmp_path):
    proc = ServiceProcess(
        "mock-workers",
        ["--count", "2", "--worker-id-base", "500", "--kv-blocks", "128", "--speedup", "20", "--worker-ttl-s", "3"],
        nats_url=nats_url,
        pools=["proc"],
        log_path=str(tmp_path / "mock.log"),
    )
    proc.start()
    try:
        await asyncio.to_thread(proc.wait_ready, 30)
        status = await asyncio.to_thread(proc.readyz)
        assert status["worker_ids"] == [500, 501]
        assert "kvr_mock_worker_requests_total" in await asyncio.to_thread(proc.metrics)
        kv = await nc.jetstream().key_value("KVR_WORKERS")
        assert sorted(await kv.keys()) == ["proc.500", "proc.501"]
    finally:
        code = await asyncio.to_thread(proc.terminate)
    assert code == 0
    kv = await nc.jetstream().key_value("KVR_WORKERS")
    try:
        left = await kv.keys()
    except Exception:  # noqa: BLE001 - nats raises when no keys are left
        left = []
    assert left == []
