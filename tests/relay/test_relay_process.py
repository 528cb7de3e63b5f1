"""`kvr relay` as a real process beside a fake engine, feeding a real `kvr indexer` process."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.errors import KeyNotFoundError

from bench.lib.fake_engine import FakeEngine
from schemas import MatchReply, MatchRequest, codec
from schemas.discovery import WorkerRecord
from schemas.subjects import Names
from services.relay.app import worker_id_for
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request

from .helpers import ports

P1 = list(range(1, 65))
P2 = P1[:32] + list(range(1000, 1032))


async def match(nc, tokens: list[int]) -> dict[tuple[int, int], int]:
    reply = await request(nc, Names().match("p"), MatchRequest(token_ids=tokens), MatchReply, timeout=2)
    return {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}


async def test_relay_process_feeds_indexer_heartbeats_and_deregisters(nats_url, nc, tmp_path):
    zp, rp = ports()
    eng = FakeEngine(zp, rp, encoding="map").start()
    relay = ServiceProcess(
        "relay",
        args=["--zmq", f"tcp://127.0.0.1:{zp}", "--replay", f"tcp://127.0.0.1:{rp}", "--heartbeat-ttl-s", "0.9",
              "--taints", "gpu=h100,zone=a", "--total-kv-blocks", "4096"],
        nats_url=nats_url,
        pools=["p"],
        env={"POD_NAME": "vllm-7", "POD_IP": "10.1.2.3"},
        log_path=str(tmp_path / "relay.log"),
    ).start()
    indexer = ServiceProcess("indexer", nats_url=nats_url, pools=["p"], log_path=str(tmp_path / "indexer.log")).start()
    wid = worker_id_for("vllm-7")
    try:
        await asyncio.to_thread(relay.wait_ready, 30)
        await asyncio.to_thread(indexer.wait_ready, 30)
        await eng.wait_subscribed()
        s1, d1 = eng.stored(P1)
        await eng.publish([s1])
        await eng.publish([eng.stored(P2[32:], parent=d1[1])[0]])
        await eng.publish([eng.removed(d1[3:])])

        want = {(wid, 0): 3}
        for _ in range(100):
            if await match(nc, P1) == want:
                break
            await asyncio.sleep(0.05)
        assert await match(nc, P1) == want
        assert await match(nc, P2) == {(wid, 0): 4}

        kv = await nc.jetstream().key_value("KVR_WORKERS")
        first = await kv.get(f"p.{wid}")
        record = codec.decode(first.value, WorkerRecord)
        assert (record.pod_name, record.address, record.taints, record.total_kv_blocks) == (
            "vllm-7", "10.1.2.3", ["gpu=h100", "zone=a"], 4096)
        await asyncio.sleep(0.7)
        later = await kv.get(f"p.{wid}")
        assert later.revision > first.revision  # heartbeat every ttl/3
        assert codec.decode(later.value, WorkerRecord).heartbeat_ms > record.heartbeat_ms

        status = relay.readyz()
        assert status["worker_id"] == wid and status["ranks"]["0"]["last_seq"] == 2
        assert "kvr_relay_published_events_total" in relay.metrics()

        assert await asyncio.to_thread(relay.terminate) == 0
        with pytest.raises(KeyNotFoundError):
            await kv.get(f"p.{wid}")
    finally:
        relay.kill()
        indexer.terminate()
        await eng.close()
