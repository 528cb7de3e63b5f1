"""`kvr relay --source dynamo`: Dynamo's event plane over ZMQ → KVR_KV.

`FakeDynamoPublisher` is written here from Dynamo's framing, independently of `schemas/dynamo.py`:
an XPUB socket (so the test knows the relay subscribed) sending `[topic, publisher_id u64 BE,
sequence u64 BE, body]`, body = version byte 1 + payload length u32 BE + a msgpack map envelope
`{publisher_id, sequence, published_at, topic, payload}`, payload = msgpack of a list of RouterEvent
maps (what Dynamo's `rmp_serde::to_vec_named` writes). Real ZMQ sockets, a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.lib.refindex import RefIndex
from schemas.dynamo import BadFrame, decode_message
from schemas.hashing import local_block_hashes
from services.relay.app import worker_id_for
from services.relay.seqtrack import PlaneSequencer

from .helpers import metric, ports, relay_cfg, start_relay, wait_kv

WID = worker_id_for("vllm-0")
TOPIC = "namespace.dynamo.component.backend.kv-events"
P1 = list(range(1, 65))  # 4 blocks of 16
P2 = list(range(3000, 3032))  # 2 blocks
P3 = list(range(9000, 9048))  # 3 blocks


def stored(
    tokens: list[int], base: int, parent: int | None = None, dp_rank: int = 0, domain: str | None = "worker", event_id: int = 0
) -> dict:
    hashes = local_block_hashes(tokens, 16)
    blocks = [{"block_hash": base + i, "tokens_hash": h, "mm_extra_info": None} for i, h in enumerate(hashes)]
    ev = {
        "worker_id": 2**63 + 12345,  # Dynamo's own instance id: any u64
        "storage_tier": "device",
        "event": {
            "event_id": event_id or random.randint(1, 100), "dp_rank": dp_rank,
            "data": {"stored": {"parent_hash": parent, "start_position": None, "blocks": blocks}},
        },
    }
    if domain is not None:
        ev["residency_domain"] = domain
    return ev


def cleared(domain: str) -> dict:
    return {"worker_id": 5, "storage_tier": "device", "residency_domain": domain, "event": {"event_id": 9, "data": "cleared", "dp_rank": 0}}


def frames(publisher_id: int, sequence: int, events: list[dict], topic: str = TOPIC) -> list[bytes]:
    envelope = msgspec.msgpack.encode({
        "publisher_id": publisher_id, "sequence": sequence, "published_at": int(time.time() * 1000),
        "topic": topic, "payload": msgspec.msgpack.encode(events),
    })
    body = struct.pack(">BI", 1, len(envelope)) + envelope
    return [topic.encode(), struct.pack(">Q", publisher_id), struct.pack(">Q", sequence), body]


class FakeDynamoPublisher:
    def __init__(self, port: int) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        try:
            self.pub.bind(f"tcp://127.0.0.1:{port}")
        except zmq.ZMQError:
            self.close()
            raise
        self.publisher_id = random.getrandbits(64)
        self.sequence = 0

    async def wait_subscribed(self, timeout: float = 5.0) -> None:
        assert await self.pub.poll(int(timeout * 1000)), "no subscriber"
        assert (await self.pub.recv()).startswith(b"\x01")

    async def send(self, events: list[dict], *, lose: bool = False) -> None:
        self.sequence += 1
        if not lose:
            await self.pub.send_multipart(frames(self.publisher_id, self.sequence, events))

    async def send_raw(self, parts: list[bytes]) -> None:
        await self.pub.send_multipart(parts)

    def restart(self) -> None:
        self.publisher_id = random.getrandbits(64)
        self.sequence = 0

    def close(self) -> None:
        self.ctx.destroy(linger=0)  # the socket too: term() would block while it is open


async def test_dynamo_publisher_feeds_kvr_kv_with_gaps_restarts_and_bad_frames(nats_url, nc):
    (port,) = ports(1)
    dyn = FakeDynamoPublisher(port)
    try:
        relay = await start_relay(relay_cfg(nats_url, port, None, "--source", "dynamo", "--topic", "namespace.dynamo"))
    except BaseException:
        dyn.close()
        raise
    js = nc.jetstream()
    before = {
        "frames": metric("kvr_relay_invalid_total", reason="frames"),
        "version": metric("kvr_relay_invalid_total", reason="frame_version"),
        "payload": metric("kvr_relay_invalid_total", reason="payload"),
        "owner": metric("kvr_relay_other_domain_events_total", domain="cache_owner"),
        "gaps": metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0"),
        "restarts": metric("kvr_relay_engine_restarts_total", dp_rank="0"),
    }
    try:
        await dyn.wait_subscribed()
        await dyn.send([stored(P1[:32], 100)])  # seq 1: the first message clears the rank (start)
        await dyn.send([cleared("cache_owner"), stored(P1[32:], 102, parent=101, domain=None)])  # seq 2
        events = await wait_kv(js, 3)
        assert [(e.kind, e.event.event_id) for e in events] == [("cleared", 1), ("stored", 2), ("stored", 3)]
        assert {e.worker_id for e in events} == {WID}  # the relay's worker, not Dynamo's instance id
        assert RefIndex().apply_all(events).match(P1) == {(WID, 0): 4}  # the cache_owner clear was not the worker's

        # malformed messages: counted, skipped whole, no state change (seq 99 is not a jump)
        await dyn.send_raw([TOPIC.encode(), b"\x00" * 8, b"\x00" * 8])
        bad = frames(dyn.publisher_id, 99, [stored(P2, 200)])
        await dyn.send_raw(bad[:3] + [b"\x07" + bad[3][1:]])
        await dyn.send_raw(frames(dyn.publisher_id, 98, [{"worker_id": "x"}])[:3] + [frames(dyn.publisher_id, 98, [{"worker_id": "x"}])[3]])
        await dyn.send([stored(P2, 200)])  # seq 3: in order
        events = await wait_kv(js, 4)
        assert [(e.kind, e.event.event_id) for e in events][-1] == ("stored", 4)

        await dyn.send([{**stored(P3, 300)}], lose=True)  # seq 4 never arrives
        await dyn.send([stored(P3[:16], 400)])  # seq 5: the jump clears the rank first
        events = await wait_kv(js, 6)
        assert [(e.kind, e.event.event_id) for e in events][-2:] == [("cleared", 5), ("stored", 6)]
        idx = RefIndex().apply_all(events)
        assert idx.match(P1) == {(WID, 0): 0} and idx.match(P3) == {(WID, 0): 1}

        dyn.restart()  # a new publisher process: new id, sequence from 1 again
        await dyn.send([stored(P2, 500)])
        events = await wait_kv(js, 8)
        assert [(e.kind, e.event.event_id) for e in events][-2:] == [("cleared", 7), ("stored", 8)]
        idx = RefIndex().apply_all(events)
        assert idx.match(P2) == {(WID, 0): 2} and idx.match(P3) == {(WID, 0): 0}

        assert metric("kvr_relay_invalid_total", reason="frames") - before["frames"] == 1
        assert metric("kvr_relay_invalid_total", reason="frame_version") - before["version"] == 1
        assert metric("kvr_relay_invalid_total", reason="payload") - before["payload"] == 1
        assert metric("kvr_relay_other_domain_events_total", domain="cache_owner") - before["owner"] == 1
        assert metric("kvr_relay_unrecoverable_gaps_total", dp_rank="0") - before["gaps"] == 1
        assert metric("kvr_relay_engine_restarts_total", dp_rank="0") - before["restarts"] == 1
        assert relay.app.plane is not None and relay.app.plane.invalid == 3
        await asyncio.sleep(0.2)
        assert len(await wait_kv(js, 8)) == 8  # nothing else was published
    finally:
        await relay.stop()
        dyn.close()


# --- the pure parts ---------------------------------------------------------------------------


def test_decode_message_reads_dynamos_framing():
    msg = decode_message(frames(7, 3, [stored(P2, 10, dp_rank=1)]))
    assert (msg.publisher_id, msg.sequence, msg.topic) == (7, 3, TOPIC.encode())
    assert msg.events[0].worker_id == 2**63 + 12345 and msg.events[0].event.dp_rank == 1
    assert msg.events[0].as_worker(WID).worker_id == WID
    single = frames(7, 4, [])
    env = msgspec.msgpack.decode(single[3][5:])
    env["payload"] = msgspec.msgpack.encode(stored(P2, 10))  # one RouterEvent, not a list
    body = msgspec.msgpack.encode(env)
    assert len(decode_message([*single[:3], struct.pack(">BI", 1, len(body)) + body]).events) == 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:3], "frames"),
        (lambda f: [f[0], f[1][:4], f[2], f[3]], "header"),
        (lambda f: [*f[:3], f[3][:3]], "frame_header"),
        (lambda f: [*f[:3], b"\x02" + f[3][1:]], "frame_version"),
        (lambda f: [*f[:3], f[3][:-1]], "frame_length"),
        (lambda f: [*f[:3], struct.pack(">BI", 1, 3) + b"\xc1\xc1\xc1"], "envelope"),
        (lambda f: [f[0], struct.pack(">Q", 8), f[2], f[3]], "envelope_mismatch"),
    ],
)
def test_bad_frames_name_their_reason(mutate, reason):
    with pytest.raises(BadFrame) as exc:
        decode_message(mutate(frames(7, 3, [stored(P2, 10)])))
    assert exc.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_decode_or_raise_badframe(parts):
    with contextlib.suppress(BadFrame):
        decode_message(parts)


def test_sequencer_start_gap_duplicate_restart_and_ranks():
    seq = PlaneSequencer(clear_on_start=True)
    assert seq.on_message(1, 10, {0}) == (True, [(0, "start")])
    assert seq.on_message(1, 11, {0, 1}) == (True, [(1, "start")])
    assert seq.on_message(1, 11, {0}) == (False, [])  # duplicate
    assert seq.on_message(1, 9, {0}) == (False, [])  # older
    assert seq.on_message(1, 13, set()) == (True, [(0, "unrecoverable_gap"), (1, "unrecoverable_gap")])
    assert seq.on_message(2, 1, {1}) == (True, [(1, "engine_restart")])  # rank 1 now fed by publisher 2
    assert seq.on_message(1, 15, {0}) == (True, [(0, "unrecoverable_gap")])  # only the ranks it still feeds
    quiet = PlaneSequencer(clear_on_start=False)
    assert quiet.on_message(5, 0, {0}) == (True, [])


def test_sequencer_memory_is_bounded():
    seq = PlaneSequencer(max_publishers=8)
    for pid in range(1000):
        seq.on_message(pid, 1, {0})
    assert len(seq.publishers) == 8 and seq.owner == {0: 999}


def test_dynamo_source_has_no_replay_socket(nats_url):
    from services.relay.app import RelayApp

    with pytest.raises(ValueError, match="replay"):
        RelayApp(relay_cfg(nats_url, 5557, 5558, "--source", "dynamo"))
    app = RelayApp(relay_cfg(nats_url, 5557, None, "--source", "dynamo", "--dp-size", "2"))
    assert set(app.endpoints) == {0, 1} and app.replay_endpoints == {}


valid_event = st.builds(
    lambda tokens, base, rank, domain: stored(tokens, base, dp_rank=rank, domain=domain, event_id=1),
    st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=48), st.integers(1, 2**40), st.sampled_from([0, 1, 7]),
    st.sampled_from(["worker", None, "cache_owner"]),
)
message = st.one_of(
    st.builds(frames, st.sampled_from([1, 2, 2**64 - 1]), st.integers(0, 20), st.lists(valid_event, max_size=3)),
    st.lists(st.binary(max_size=40), max_size=5),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(message, max_size=25))
def test_the_intake_survives_any_frames_and_emits_only_served_ranks_in_order(msgs):
    from services.relay.plane import PlaneIntake

    out: list[tuple[str, int, object]] = []
    intake = PlaneIntake(
        None, [], {0, 1}, WID, topic="",  # on_frames needs no socket
        events=lambda rank, evs: out.append(("events", rank, evs)), clear=lambda rank, cause: out.append(("clear", rank, cause)),
    )
    for parts in msgs:
        intake.on_frames(parts)  # never raises
    for kind, rank, payload in out:
        assert rank in (0, 1)
        if kind == "events":
            assert all(ev.worker_id == WID and ev.worker_domain for ev in payload)
    first = {}
    for i, (kind, rank, _) in enumerate(out):
        first.setdefault(rank, (i, kind))
    assert all(kind == "clear" for _, kind in first.values())  # every rank starts with a clear
    assert len(intake.sequencer.publishers) <= 3
