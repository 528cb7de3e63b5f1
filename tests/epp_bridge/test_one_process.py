"""One-process mode: `kvr epp-bridge --epp-embedded-scheduler --embedded-indexer` routes, books and frees alone."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from schemas import codec
from schemas.api import StateReply, StateRequest
from schemas.events import kv_msg_id
from schemas.subjects import Names
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request

from .helpers import record, register, stored_events

NAMES = Names()
pytestmark = pytest.mark.integration


async def ask(nc, subject: str, payload: dict) -> dict:
    msg = await nc.request(subject, codec.encode_json(payload), timeout=10)
    return msgspec.json.decode(msg.data)


async def test_embedded_scheduler_and_indexer(nats_url, tokenizer_dir, tmp_path):
    bridge = ServiceProcess(
        "epp-bridge",
        ["--epp-embedded-scheduler", "--embedded-indexer", "--epp-tokenizer-dir", str(tokenizer_dir), "--block-size", "4"],
        nats_url=nats_url, pools=["one"], log_path=str(tmp_path / "bridge.log"),
    )
    bridge.start().wait_ready(60)
    try:
        assert bridge.readyz()["_http_status"] == 200
        nc = await nats.connect(nats_url)
        try:
            await register(nc, [record(1, pool="one"), record(2, pool="one")])
            tokens = list(range(500, 500 + 6 * 4))
            js = nc.jetstream()
            await js.publish(NAMES.kv_subject("one", 2, 0), stored_events(2, tokens, 4), headers={"Nats-Msg-Id": kv_msg_id("one", 2, 0, 1)})
            query = {"request_id": "op-1", "body": {"prompt": "", "nvext": {"token_data": tokens}}}
            for _ in range(200):
                reply = await ask(nc, NAMES.epp_query("one"), {**query, "book": False})
                if reply.get("status") == "ok" and reply["overlap_blocks"] == 6:
                    break
                await asyncio.sleep(0.05)
            assert reply["status"] == "ok" and reply["decode"]["worker_id"] == 2 and reply["overlap_blocks"] == 6, reply
            assert reply["headers"]["x-gateway-destination-endpoint"] == "10.0.0.2:8000"

            booked = await ask(nc, NAMES.epp_query("one"), query)
            assert booked["status"] == "ok" and booked["decode"]["worker_id"] == 2
            state = await request(nc, NAMES.scheduler_state("one"), StateRequest(), StateReply)
            assert state.bookings == ["op-1"]
            assert (await ask(nc, NAMES.epp_cleanup("one"), {"request_id": "op-1", "phase": "free"}))["known"] is True
            assert (await ask(nc, NAMES.epp_cleanup("one"), {"request_id": "op-1", "phase": "free"}))["known"] is False
            state = await request(nc, NAMES.scheduler_state("one"), StateRequest(), StateReply)
            assert state.bookings == []
            assert "kvr_epp_queries_total" in bridge.metrics() and "kvr_scheduler_" in bridge.metrics()
        finally:
            await nc.close()
    finally:
        exit_code = bridge.terminate()
    assert exit_code == 0  # SIGTERM drains the bridge and its embedded scheduler cleanly


async def test_one_process_mode_is_composed_from_cores_on_one_discovery_watcher(nats_url, nc):
    """Bridge, embedded scheduler and its index replica listen to the process's one watcher: the
    bucket is followed once, and a worker removed from discovery leaves all three at once."""
    from services.epp_bridge.link import EmbeddedSchedulerLink

    from .helpers import start_bridge

    bridge = await start_bridge(nc, nats_url, "--pool", "p", "--epp-embedded-scheduler", "--embedded-indexer", "--block-size", "4")
    try:
        await register(nc, [record(1), record(2)])
        assert isinstance(bridge.link, EmbeddedSchedulerLink)
        scheduler = bridge.link.app
        replica = scheduler.overlap.replica
        assert bridge.watcher is scheduler.watcher is replica.watcher
        tokens = list(range(900, 900 + 5 * 4))
        await nc.jetstream().publish(NAMES.kv_subject("p", 2, 0), stored_events(2, tokens, 4), headers={"Nats-Msg-Id": kv_msg_id("p", 2, 0, 1)})
        query = {"request_id": "c-1", "body": {"prompt": "", "nvext": {"token_data": tokens}}, "book": False}
        for _ in range(200):
            reply = await ask(nc, NAMES.epp_query("p"), query)
            if reply.get("status") == "ok" and reply["overlap_blocks"] == 5 and bridge.ready():
                break
            await asyncio.sleep(0.05)
        assert reply["decode"]["worker_id"] == 2 and reply["overlap_blocks"] == 5, reply
        from services.runtime.workers import delete_worker

        await delete_worker(nc, NAMES.workers_bucket, "p", 2)
        for _ in range(200):
            if not replica.index("p").worker_keys() and len(scheduler.candidates("p")) == 1:
                break
            await asyncio.sleep(0.05)
        assert replica.index("p").worker_keys() == [] and [c.worker_id for c in scheduler.candidates("p")] == [1]
        assert [r.worker_id for r in bridge.watcher.directory.live("p")] == [1]
        assert (await ask(nc, NAMES.epp_query("p"), query))["decode"]["worker_id"] == 1
    finally:
        await bridge.stop()
    assert bridge.watcher.follower._task is None or bridge.watcher.follower._task.done()
