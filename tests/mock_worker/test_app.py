"""The mock fleet against a real nats-server: discovery, generate streaming, KV events, bad input."""

from __future__ import annotations

import asyncio

import msgspec

from schemas import RouterEvent, WorkerRecord, codec
from schemas.subjects import Names
from schemas.worker import GenerateProgress, GenerateRequest
from services.mock_worker.app import FleetConfig, MockFleet
from services.mock_worker.engine import EngineConfig
from services.runtime.natsio import StreamSettings, provision

NAMES = Names()


async def generate(nc, subject: str, payload: bytes, timeout: float = 10.0) -> list:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, payload, reply=inbox)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            body = msgspec.json.decode(msg.data)
            out.append(body)
            if body.get("status") == "error" or body.get("type") == "done":
                return out
    finally:
        await sub.unsubscribe()


async def read_kv_events(js, pool: str) -> list[RouterEvent]:
    sub = await js.pull_subscribe(NAMES.kv_filter(pool), stream="KVR_KV")
    events: list[RouterEvent] = []
    try:
        while True:
            msgs = await sub.fetch(500, timeout=0.5)
            for msg in msgs:
                decoded = codec.decode(msg.data, RouterEvent | list[RouterEvent])
                events.extend(decoded if isinstance(decoded, list) else [decoded])
    except Exception:  # noqa: BLE001 - fetch timeout = no more messages
        pass
    return events


async def test_fleet_registers_generates_and_publishes_events(nc):
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    cfg = FleetConfig(
        pool="p1",
        count=2,
        worker_id_base=100,
        engine=EngineConfig(block_size=4, kv_blocks=64, max_num_batched_tokens=64),
        speedup=50.0,
        ttl_s=3.0,
        load_interval_s=0.05,
    )
    fleet = MockFleet(nc, NAMES, cfg)
    loads = []

    async def on_load(msg) -> None:
        loads.append(msg)

    load_sub = await nc.subscribe(NAMES.load_subject("p1"), cb=on_load)
    await fleet.start()
    try:
        kv = await js.key_value("KVR_WORKERS")
        rec = codec.decode((await kv.get("p1.100")).value, WorkerRecord)
        assert rec.pod_name == "mock-100" and rec.block_size == 4 and rec.total_kv_blocks == 64

        prompt = list(range(1, 19))
        req = GenerateRequest(request_id="a", token_ids=prompt, max_tokens=5)
        first = await generate(nc, NAMES.generate("p1", 100), codec.encode_json(req))
        assert [m["type"] for m in first] == ["first_token", "done"]
        assert first[1]["prompt_tokens"] == 18 and first[1]["cached_tokens"] == 0 and first[1]["output_tokens"] == 5
        assert first[1]["e2e_ms"] >= first[1]["ttft_ms"] > 0

        # same prefix again, msgpack this time: served from cache
        req2 = GenerateRequest(request_id="b", token_ids=prompt + [99], max_tokens=2)
        second = await _generate_msgpack(nc, NAMES.generate("p1", 100), req2)
        assert second[-1]["cached_tokens"] == 16

        # bad input: structured errors, nothing changes
        bad = await generate(nc, NAMES.generate("p1", 100), b'{"request_id": "c", "token_ids": ["x"]}')
        assert bad[0]["status"] == "error" and bad[0]["error"]["path"] == "$.token_ids[0]"
        bad = await generate(nc, NAMES.generate("p1", 100), b"{nope")
        assert bad[0]["error"]["code"] == "invalid_request"
        too_big = GenerateRequest(request_id="d", token_ids=list(range(1000)), max_tokens=1)
        bad = await generate(nc, NAMES.generate("p1", 100), codec.encode_json(too_big))
        assert bad[0]["error"]["code"] == "invalid_request" and "blocks" in bad[0]["error"]["message"]
        assert fleet.workers[0].engine.stats.requests == 2

        await asyncio.sleep(0.2)
        assert await fleet.workers[0].publisher.flushed(5)
        events = [e for e in await read_kv_events(js, "p1") if e.worker_id == 100]
        assert events[0].kind == "cleared"
        ids = [e.event.event_id for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        stored = {b.block_hash for e in events if e.kind == "stored" for b in e.event.data.stored.blocks}
        removed = {h for e in events if e.kind == "removed" for h in e.event.data.removed.block_hashes}
        assert stored - removed == set(fleet.workers[0].engine.cached_blocks())
        assert loads, "load reports are published"
    finally:
        await load_sub.unsubscribe()
        await fleet.stop()
    kv = await js.key_value("KVR_WORKERS")
    keys = []
    try:
        keys = await kv.keys()
    except Exception:  # noqa: BLE001 - no keys left
        keys = []
    assert "p1.100" not in keys and "p1.101" not in keys


async def _generate_msgpack(nc, subject: str, req: GenerateRequest) -> list:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, codec.encode_msgpack(req), reply=inbox, headers={"Content-Type": codec.MSGPACK})
    out = []
    while True:
        msg = await sub.next_msg(timeout=10)
        body = codec.decode(msg.data, GenerateProgress)
        out.append(msgspec.to_builtins(body))
        if out[-1]["type"] == "done":
            await sub.unsubscribe()
            return out
