"""Shared runtime against a real nats-server: provisioning, responder error mapping, follower."""

from __future__ import annotations

import asyncio

import msgspec
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from schemas import MatchReply, MatchRequest, RemoteError, codec
from schemas.api import ErrorCode
from schemas.subjects import Names
from services.runtime.follower import StreamFollower
from services.runtime.natsio import ProvisioningError, StreamSettings, ensure_stream, provision, stream_configs
from services.runtime.responder import ServiceError, request, serve

NAMES = Names()


async def publish_with_retry(js, subject: str, data: bytes, attempts: int = 100) -> None:
    # A publisher's retry loop: the same Nats-Msg-Id makes a retried publish land once.
    for _ in range(attempts):
        try:
            await js.publish(subject, data, timeout=0.5, headers={"Nats-Msg-Id": f"{subject}:{data.decode()}"})
            return
        except Exception:  # noqa: BLE001 - server still restarting
            await asyncio.sleep(0.1)
    raise AssertionError("could not publish after restart")


async def test_provisioning_is_idempotent(nc):
    js = nc.jetstream()
    first = await provision(js, NAMES, StreamSettings())
    assert set(first.values()) == {"created"}
    second = await provision(js, NAMES, StreamSettings())
    assert set(second.values()) == {"exists"}
    info = await js.stream_info("KVR_KV")
    assert info.config.subjects == ["kvr.*.kv.>"]
    assert info.config.max_age == pytest.approx(3600)
    assert info.config.duplicate_window == pytest.approx(120)
    assert info.config.max_bytes == 1 << 30 and info.config.discard == DiscardPolicy.OLD
    bookings = await js.stream_info("KVR_BOOKINGS")
    assert bookings.config.max_bytes == 256 << 20 and bookings.config.discard == DiscardPolicy.NEW


async def test_stream_byte_limits_are_compared_and_a_full_bookings_stream_refuses(nc):
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings(kv_max_bytes=0, bookings_max_bytes=4096))
    with pytest.raises(ProvisioningError) as err:
        await provision(js, NAMES, StreamSettings(kv_max_bytes=1 << 20, bookings_max_bytes=4096))
    assert "KVR_KV" in str(err.value) and "max_bytes: want 1048576, have -1" in str(err.value)
    await js.delete_stream("KVR_KV")
    await js.add_stream(StreamConfig(name="KVR_KV", subjects=["kvr.*.kv.>"], max_age=3600, duplicate_window=120, discard=DiscardPolicy.NEW))
    with pytest.raises(ProvisioningError, match="discard: want old, have new"):
        await provision(js, NAMES, StreamSettings(kv_max_bytes=0, bookings_max_bytes=4096))
    # discard new: a full bookings stream refuses the publish, it never drops what it accepted
    stored = 0
    with pytest.raises(nats.js.errors.APIError):
        for _ in range(100):
            await js.publish("kvr.p.bookings.r", b"x" * 500)
            stored += 1
    info = await js.stream_info("KVR_BOOKINGS")
    assert info.state.messages == stored and info.state.first_seq == 1


async def test_conflicting_stream_is_reported_not_changed(nc):
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="KVR_KV", subjects=["kvr.*.kv.>"], max_age=60))
    with pytest.raises(ProvisioningError) as err:
        await provision(js, NAMES, StreamSettings())
    assert "KVR_KV" in str(err.value) and "max_age" in str(err.value)
    info = await js.stream_info("KVR_KV")
    assert info.config.max_age == pytest.approx(60)  # untouched


async def test_conflicting_subjects_named_in_error(nc):
    js = nc.jetstream()
    want = stream_configs(NAMES, StreamSettings())[1]
    await js.add_stream(StreamConfig(name=want.name, subjects=["other.>"], max_age=600, duplicate_window=120))
    with pytest.raises(ProvisioningError, match="subjects"):
        await ensure_stream(js, want)


async def test_responder_maps_errors_and_stays_up(nc):
    async def handler(req: MatchRequest, _msg):
        if req.block_hashes == [13]:
            raise ServiceError(ErrorCode.NOT_FOUND, "unlucky")
        if req.block_hashes == [666]:
            raise RuntimeError("boom")
        return MatchReply(block_size=16, scores=[], tier_scores={}, tree_sizes=[], stream_seq=len(req.block_hashes or []))

    await serve(nc, "t.match", MatchRequest, handler, queue="t")
    bad_payloads = [b"{not json", b"[]", b'{"block_hashes": ["x"]}', b'{"block_hashes": [1], "token_ids": [1]}', b"\xff\xfe"]
    for payload in bad_payloads:
        msg = await nc.request("t.match", payload, timeout=2)
        reply = msgspec.json.decode(msg.data)
        assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request", reply
    msg = await nc.request("t.match", b'{"block_hashes": ["x"]}', timeout=2)
    assert msgspec.json.decode(msg.data)["error"]["path"] == "$.block_hashes[0]"

    with pytest.raises(RemoteError) as err:
        await request(nc, "t.match", MatchRequest(block_hashes=[13]), MatchReply)
    assert err.value.code == "not_found"
    with pytest.raises(RemoteError) as err:
        await request(nc, "t.match", MatchRequest(block_hashes=[666]), MatchReply)
    assert err.value.code == "internal"

    # still serving, in JSON and msgpack
    reply = await request(nc, "t.match", MatchRequest(block_hashes=[1, 2, 3]), MatchReply)
    assert reply.stream_seq == 3
    reply = await request(nc, "t.match", MatchRequest(block_hashes=[1, 2]), MatchReply, msgpack=True)
    assert reply.stream_seq == 2
    bad = await nc.request("t.match", b"\xc1", timeout=2, headers={"Content-Type": codec.MSGPACK})
    assert msgspec.msgpack.decode(bad.data)["error"]["code"] == "invalid_request"


async def test_inline_requests_run_in_the_subscription_task_and_others_concurrently(nc):
    """`inline(req)` True → answered in the subscription's own task; False → a task of its own, so a
    slow request does not hold up the inline ones; a bad request still gets its envelope."""
    tasks: dict[int, asyncio.Task | None] = {}
    release = asyncio.Event()

    async def handler(req: MatchRequest, _msg):
        first = (req.block_hashes or [0])[0]
        tasks[first] = asyncio.current_task()
        if first >= 100:  # the non-inline kind waits for the test
            await release.wait()
        if first == 13:
            raise ServiceError(ErrorCode.NOT_FOUND, "unlucky")
        return MatchReply(block_size=16, scores=[], tier_scores={}, tree_sizes=[], stream_seq=first)

    await serve(nc, "t.inline", MatchRequest, handler, max_inflight=8, inline=lambda req: req.block_hashes[0] < 100)
    slow = asyncio.create_task(request(nc, "t.inline", MatchRequest(block_hashes=[100]), MatchReply, timeout=5))
    for i in range(20, 100):  # more than one inline burst
        reply = await request(nc, "t.inline", MatchRequest(block_hashes=[i]), MatchReply)
        assert reply.stream_seq == i
    assert not slow.done()  # waiting in its own task while 80 inline requests were answered
    inline_tasks = {tasks[i] for i in range(20, 100)}
    assert len(inline_tasks) == 1 and tasks[100] not in inline_tasks
    with pytest.raises(RemoteError) as err:
        await request(nc, "t.inline", MatchRequest(block_hashes=[13]), MatchReply)
    assert err.value.code == "not_found"
    bad = await nc.request("t.inline", b'{"block_hashes": ["x"]}', timeout=2)
    assert msgspec.json.decode(bad.data)["error"]["path"] == "$.block_hashes[0]"
    release.set()
    assert (await slow).stream_seq == 100


async def test_follower_applies_in_order_and_resumes_after_server_restart(nats_server, nc):
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    for i in range(50):
        await js.publish(NAMES.kv_subject("p", 1, 0), str(i).encode())
    seen: list[tuple[int, bytes]] = []
    follower = StreamFollower(nc, "KVR_KV", [NAMES.kv_filter("p")], lambda s, _subj, d, _h: seen.append((s, d)), batch=16)
    follower.start()
    await asyncio.wait_for(follower.caught_up.wait(), 10)
    assert [d for _, d in seen] == [str(i).encode() for i in range(50)]

    nats_server.restart()  # same port, same store
    for i in range(50, 80):
        await publish_with_retry(js, NAMES.kv_subject("p", 1, 0), str(i).encode())
    for _ in range(100):
        if len(seen) >= 80:
            break
        await asyncio.sleep(0.1)
    await follower.stop()
    assert [s for s, _ in seen] == list(range(1, 81))
    assert [d for _, d in seen] == [str(i).encode() for i in range(80)]


REQUEST_TYPES = {
    "match": (schemas_api := __import__("schemas.api", fromlist=["x"])).MatchRequest,
    "dump": schemas_api.DumpRequest,
    "select": schemas_api.SelectRequest,
    "state": schemas_api.StateRequest,
    "query": schemas_api.EppQueryRequest,
    "cleanup": schemas_api.CleanupRequest,
}
MALFORMED = {
    "match": (b'{"token_ids": [1, "two"]}', "$.token_ids[1]"),
    "dump": (b"[1]", "$"),
    "select": (b'{"request_id": "r", "token_ids": [1], "allowed_worker_ids": [-1]}', "$.allowed_worker_ids[0]"),
    "state": (b'"x"', "$"),
    "query": (b'{"request_id": "r", "body": {}, "pods": [{"port": 70000}]}', "$.pods[0].port"),
    "cleanup": (b'{"request_id": 5, "phase": "free"}', "$.request_id"),
}


@pytest.mark.parametrize("kind", sorted(REQUEST_TYPES))
async def test_malformed_request_of_each_type_gets_path_and_service_survives(nc, kind):
    calls = []

    async def handler(req, _msg):
        calls.append(req)
        return schemas_api.CleanupReply(request_id="ok", known=True)

    subject = f"t.{kind}"
    await serve(nc, subject, REQUEST_TYPES[kind], handler, queue="q")
    payload, path = MALFORMED[kind]
    for ctype in (None, codec.MSGPACK):
        data = payload if ctype is None else codec.encode_msgpack(msgspec.json.decode(payload))
        headers = {"Content-Type": ctype} if ctype else None
        msg = await nc.request(subject, data, timeout=2, headers=headers)
        reply = (msgspec.msgpack if ctype else msgspec.json).decode(msg.data)
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "invalid_request"
        assert reply["error"]["path"] == path
    for garbage in (b"", b"\x00\x01", b"{" * 10_000):
        msg = await nc.request(subject, garbage, timeout=2)
        assert msgspec.json.decode(msg.data)["error"]["code"] == "invalid_request"
    assert calls == []  # the handler never saw a bad request
