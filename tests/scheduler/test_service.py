"""The scheduler adapter on a real nats-server: discovery, booking lifecycle, bad input, modes."""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from schemas import codec
from schemas.api import CleanupReply, CleanupRequest, SelectReply, SelectRequest
from schemas.bookings import BookingAdd
from schemas.codec import RemoteError
from schemas.discovery import LoadReport
from services.runtime.responder import request
from services.runtime.workers import delete_worker, put_worker

from .conftest import NAMES, POOL, running_scheduler, state_of
from .helpers import record

TOKENS = list(range(1, 65))  # 4 blocks of 16


def now_ms() -> int:
    return int(time.time() * 1000)


async def eventually(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def put(nc, wid: int, **kw) -> None:
    kw.setdefault("heartbeat_ms", now_ms())
    await put_worker(nc, NAMES.workers_bucket, record(wid, pool=POOL, **kw))


async def select(nc, **kw) -> SelectReply:
    kw.setdefault("token_ids", TOKENS)
    return await request(nc, NAMES.select(POOL), SelectRequest(**kw), SelectReply)


async def cleanup(nc, rid: str, phase: str) -> CleanupReply:
    return await request(nc, NAMES.booking(POOL), CleanupRequest(request_id=rid, phase=phase), CleanupReply)  # type: ignore[arg-type]


def worker_ids(app) -> set[int]:
    return {c.worker_id for c in app.candidates(POOL)}


async def test_discovery_booking_lifecycle_and_worker_removal(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await put(nc, 2, dp_size=2, dp_ports=[9000, 9001])
        await eventually(lambda: len(app.candidates(POOL)) == 3)
        indexer.scores = {(2, 1): 2}
        r = await select(nc, request_id="r1")
        assert (r.decode.worker_id, r.decode.dp_rank, r.decode.endpoint, r.decode.pod_name) == (2, 1, "10.0.0.2:9001", "pod-2")
        assert (r.overlap_blocks, r.isl_tokens, r.block_size, r.mode, r.policy) == (2, 64, 16, "aggregated", "kv")
        assert r.cost == pytest.approx((64 / 16 - 2) + 0.02 * 4)  # kvr rule: prefill left + 0.02 × decode blocks
        assert indexer.requests[-1].block_hashes and len(indexer.requests[-1].block_hashes) == 4
        st = await state_of(nc, "s1")
        assert st.bookings == ["r1"] and st.workers == [1, 2]
        assert [(lo.worker_id, lo.dp_rank, lo.active_prefill_tokens, lo.active_blocks) for lo in st.loads] == [(2, 1, 32, 4)]

        assert (await cleanup(nc, "r1", "prefill_complete")).known
        st = await state_of(nc, "s1")
        assert [(lo.active_prefill_tokens, lo.active_blocks) for lo in st.loads] == [(0, 4)]

        # An update (new taints) changes candidates; a required taint then selects worker 1.
        await put(nc, 1, taints=["zone=a"])
        await eventually(lambda: any("zone=a" in c.taints for c in app.candidates(POOL)))
        r = await select(nc, request_id="r2", book=False, routing_constraints={"required_taints": ["zone=a"]})
        assert r.decode.worker_id == 1

        # Deleting worker 2 removes its candidates and releases its bookings.
        await delete_worker(nc, NAMES.workers_bucket, POOL, 2)
        await eventually(lambda: worker_ids(app) == {1})
        st = await state_of(nc, "s1")
        assert st.bookings == [] and st.loads == [] and st.workers == [1]
        assert not app.states[POOL].tracker.is_active("r1")
        assert not (await cleanup(nc, "r1", "free")).known
        # An add for the removed worker that reaches this replica after the removal (another
        # replica booked it just before) is ignored, as replicas that applied it first dropped it.
        late = BookingAdd(request_id="late", router_id="other", pool=POOL, worker_id=2, ts_ms=now_ms(), sequence_hashes=[1, 2])
        ack = await nc.jetstream().publish(NAMES.bookings_subject(POOL, "other"), codec.encode_json(late))
        await eventually(lambda: app._applied_seq >= ack.seq)
        assert not app.states[POOL].tracker.is_active("late")
        # A worker that comes back is bookable again.
        await put(nc, 2)
        await eventually(lambda: 2 in worker_ids(app))
        assert (await select(nc, request_id="back", book=True, pinned_worker_id=2)).decode.worker_id == 2
        assert app.states[POOL].tracker.is_active("back")
        await delete_worker(nc, NAMES.workers_bucket, POOL, 2)
        await eventually(lambda: worker_ids(app) == {1})

        # A record past its TTL is deleted from the bucket by the replica that notices it.
        await put(nc, 3, ttl_s=1.0)
        await eventually(lambda: 3 in worker_ids(app))
        await eventually(lambda: app.watcher.directory.get(POOL, 3) is None, 4)
        kv = await nc.jetstream().key_value(NAMES.workers_bucket)
        with pytest.raises(KeyNotFoundError):
            await kv.get(f"{POOL}.3")


@pytest.mark.parametrize("feed", ["push", "pull"])
async def test_booking_endpoint_semantics(nats_url, nc, indexer, feed):
    async with running_scheduler(nats_url, "--router-id", "s1", "--bookings-feed", feed) as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        assert not (await cleanup(nc, "ghost", "free")).known
        info = await nc.jetstream().stream_info(NAMES.bookings_stream)
        assert info.state.messages == 0  # unknown ids publish nothing
        first = await select(nc, request_id="a")
        # A retried select of a booked request answers with the booked target, books nothing new.
        again = await select(nc, request_id="a", token_ids=list(range(500, 600)))
        assert again.decode.worker_id == first.decode.worker_id and again.policy == "booked"
        assert (await nc.jetstream().stream_info(NAMES.bookings_stream)).state.messages == 1
        assert (await cleanup(nc, "a", "free")).known
        assert not (await cleanup(nc, "a", "free")).known
        # Two concurrent selects of one request id (pinned apart) both answer the one booked target.
        await put(nc, 2)
        await eventually(lambda: worker_ids(app) == {1, 2})
        r1, r2 = await asyncio.gather(select(nc, request_id="dup", pinned_worker_id=1), select(nc, request_id="dup", pinned_worker_id=2))
        assert r1.decode.worker_id == r2.decode.worker_id
        assert [leg.target[0] for leg in app.states[POOL].tracker.legs_of("dup")] == [r1.decode.worker_id]
        assert (await cleanup(nc, "dup", "free")).known
        assert (await state_of(nc, "s1")).bookings == []


async def test_disaggregated_select_books_both_legs(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        for wid, role in ((1, "prefill"), (2, "prefill"), (3, "decode")):
            await put(nc, wid, role=role)
        await eventually(lambda: worker_ids(app) == {1, 2, 3})
        indexer.scores = {(2, 0): 3}
        r = await select(nc, request_id="d1")
        assert r.mode == "disaggregated" and r.prefill is not None
        assert (r.prefill.worker_id, r.decode.worker_id, r.overlap_blocks) == (2, 3, 3)
        loads = {lo.worker_id: (lo.active_prefill_tokens, lo.active_blocks) for lo in (await state_of(nc, "s1")).loads}
        assert loads == {2: (16, 4), 3: (0, 4)}
        await cleanup(nc, "d1", "prefill_complete")
        loads = {lo.worker_id: (lo.active_prefill_tokens, lo.active_blocks) for lo in (await state_of(nc, "s1")).loads}
        assert loads == {3: (0, 4)}
        r = await select(nc, request_id="d2", mode="aggregated", book=False)
        assert r.prefill is None and r.decode.worker_id == 3


async def raw_select(nc, payload: bytes, msgpack: bool = False) -> dict:
    headers = {"Content-Type": "application/msgpack"} if msgpack else None
    msg = await nc.request(NAMES.select(POOL), payload, timeout=5, headers=headers)
    return (msgspec.msgpack.decode if msgpack else msgspec.json.decode)(msg.data)


async def test_bad_input_gets_structured_errors_and_changes_nothing(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        await select(nc, request_id="keep")
        before = await state_of(nc, "s1")
        seq_before = (await nc.jetstream().stream_info(NAMES.bookings_stream)).state.last_seq

        j = msgspec.json.encode
        cases = [
            (b"{not json", "invalid_request", None),
            (j({"request_id": "x", "token_ids": ["a", "b"]}), "invalid_request", "$.token_ids[0]"),
            (j({"request_id": "x", "token_ids": [1, -2]}), "invalid_request", "$.token_ids[1]"),
            (j({"request_id": "x", "token_ids": [1], "isl_tokens": -5}), "invalid_request", "$.isl_tokens"),
            (j({"request_id": "x", "token_ids": [1], "overrides": {"temperature": -1}}), "invalid_request", "$.overrides.temperature"),
            (b'{"request_id": "x", "token_ids": [1], "routing_constraints": {"preferred_taints": {"a": 1e999}}}',
             "invalid_request", "$.routing_constraints.preferred_taints[...]"),
            (j({"request_id": "x", "token_ids": [1], "allowed_worker_ids": [-3]}), "invalid_request", "$.allowed_worker_ids[0]"),
            (j({"request_id": "x y", "token_ids": [1]}), "invalid_request", "$.request_id"),
            (j({"request_id": "x"}), "invalid_request", None),
            (j({"request_id": "x", "token_ids": [1], "policy": "bogus"}), "invalid_request", "$.policy"),
            (j({"request_id": "x", "token_ids": [1], "mode": "weird"}), "invalid_request", "$.mode"),
            (j({"request_id": "x", "token_ids": list(range(16)), "pinned_worker_id": 999}), "not_found", None),
            (j({"request_id": "x", "token_ids": [1], "allowed_worker_ids": [5]}), "constraints_unsatisfied", None),
            (j({"request_id": "x", "block_hashes": [1] * 20_000}), "invalid_request", "$.block_hashes"),
        ]
        for payload, code, path in cases:
            reply = await raw_select(nc, payload)
            assert reply["status"] == "error", payload[:80]
            assert reply["error"]["code"] == code, (payload[:80], reply)
            if path is not None:
                assert reply["error"].get("path") == path, (payload[:80], reply)
        # NaN (msgpack can carry it) and 10^6 tokens (over the 131072 limit) — in msgpack.
        mp = msgspec.msgpack.encode
        nan = await raw_select(nc, mp({"request_id": "x", "token_ids": [1], "routing_constraints": {"preferred_taints": {"a": math.nan}}}), True)
        assert nan["error"]["code"] == "invalid_request"
        big = await raw_select(nc, mp({"request_id": "x", "token_ids": [0] * 1_000_000}), True)
        assert big["error"]["code"] == "invalid_request" and big["error"]["path"] == "$.token_ids"
        assert "exceed" in big["error"]["message"]
        with pytest.raises(RemoteError) as err:
            await request(nc, NAMES.booking(POOL), b'{"request_id": "k", "phase": "done"}', CleanupReply)
        assert err.value.code == "invalid_request"

        after = await state_of(nc, "s1")
        assert after.digest == before.digest and after.bookings == ["keep"]
        assert (await nc.jetstream().stream_info(NAMES.bookings_stream)).state.last_seq == seq_before


async def test_policies_over_nats(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1", "--pool-policy", f"{POOL}=round_robin") as app:
        await put(nc, 1)
        await put(nc, 2)
        await eventually(lambda: worker_ids(app) == {1, 2})
        indexer.scores = {(2, 0): 4}
        picks = [(await select(nc, request_id=f"q{i}", book=False)) for i in range(4)]
        assert [p.decode.worker_id for p in picks] == [1, 2, 1, 2] and {p.policy for p in picks} == {"round_robin"}
        kv = await select(nc, request_id="k", book=False, policy="kv")
        assert kv.decode.worker_id == 2 and kv.policy == "kv"


async def test_approximate_mode_predicts_cache_from_decisions(nats_url, nc):
    # No indexer at all: overlaps come from the scheduler's own past decisions.
    async with running_scheduler(nats_url, "--router-id", "s1", "--no-kv-events", "--approx-ttl-s", "60") as app:
        await put(nc, 1)
        await put(nc, 2)
        await eventually(lambda: worker_ids(app) == {1, 2})
        first = await select(nc, request_id="a1")
        assert first.overlap_blocks == 0
        # (While a1's prefill is still active the cached worker ties with the idle one: 8 vs 8.)
        assert (await cleanup(nc, "a1", "prefill_complete")).known
        again = await select(nc, request_id="a2")  # same prompt: predicted hit beats the idle worker
        assert again.decode.worker_id == first.decode.worker_id and again.overlap_blocks == 4
        other = await select(nc, request_id="a3", token_ids=list(range(1000, 1064)))
        assert other.decode.worker_id != first.decode.worker_id and other.overlap_blocks == 0
        assert app.status()["predicted_blocks"] == 8


async def test_bookings_feed_survives_a_server_restart(nats_server, nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        await select(nc, request_id="before")
        nats_server.restart()
        deadline = time.monotonic() + 20
        while True:  # the client retries while the server and the scheduler's feed come back
            try:
                await select(nc, request_id="after")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await eventually(lambda: app.states[POOL].tracker.request_ids() == ["after", "before"], 10)
        assert (await cleanup(nc, "before", "free")).known
        assert app.states[POOL].tracker.request_ids() == ["after"]


async def test_worker_load_reports_drive_busy_detection(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1", "--active-prefill-tokens-threshold", "1000") as app:
        await put(nc, 1)
        await put(nc, 2)
        await eventually(lambda: worker_ids(app) == {1, 2})
        for wid in (1, 2):
            report = LoadReport(worker_id=wid, active_prefill_tokens=5000 if wid == 1 else 10, ts_ms=now_ms())
            await nc.publish(NAMES.load_subject(POOL, wid), codec.encode_json(report))
        await nc.publish(NAMES.load_subject(POOL, 3), b"{broken")
        await eventually(lambda: len(app.fresh_reports(POOL)) == 2)
        assert (await select(nc, request_id="b1", book=False)).decode.worker_id == 2
        with pytest.raises(RemoteError) as err:
            await select(nc, request_id="b2", book=False, pinned_worker_id=1)
        assert err.value.code == "overloaded"


async def test_select_without_an_indexer_decides_on_load_alone(nats_url, nc):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await put(nc, 2)
        await eventually(lambda: worker_ids(app) == {1, 2})
        started = time.monotonic()
        # two unrelated prompts (the same prompt twice would queue behind the first's in-flight prefix)
        first = await select(nc, request_id="n1")
        second = await select(nc, request_id="n2", token_ids=[t + 1_000 for t in TOKENS])
        assert (first.decode.worker_id, second.decode.worker_id) == (1, 2)  # load-balanced, no overlaps
        assert first.overlap_blocks == 0 and app.match_failures == 2
        assert time.monotonic() - started < 1.0  # "no responders" is immediate, not a timeout


async def test_a_burst_of_concurrent_selects_spreads_instead_of_herding(nats_url, nc, indexer):
    # Eight identical prompts at the same instant, four equal workers: each select must see the load
    # the earlier ones booked (even before their bookings come back from the stream), so the burst
    # spreads. Without that, every select scores the same empty view and all land on one worker.
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        for wid in (1, 2, 3, 4):
            await put(nc, wid)
        await eventually(lambda: worker_ids(app) == {1, 2, 3, 4})
        replies = await asyncio.gather(*(select(nc, request_id=f"burst{i}") for i in range(8)))
        per_worker = {w: sum(r.decode.worker_id == w for r in replies) for w in (1, 2, 3, 4)}
        assert max(per_worker.values()) <= 3, per_worker
        # The stream copies replaced the provisional ones: the view equals a replica that only
        # applied the stream (a second replica started now).
        async with running_scheduler(nats_url, "--router-id", "s2") as other:
            await eventually(lambda: other.states[POOL].tracker.digest() == app.states[POOL].tracker.digest())
        assert not app.states[POOL].provisional
        for i in range(8):
            assert (await cleanup(nc, f"burst{i}", "free")).known
        assert app.states[POOL].tracker.request_ids() == []


async def test_a_reused_request_id_books_again_and_every_reply_names_its_request_and_booking(nats_url, nc, indexer):
    # Inside JetStream's duplicate window: the booking's message id is per attempt, so the second
    # booking of "again" is not dropped as a duplicate of the first (it used to book nothing).
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        first = await select(nc, request_id="again")
        assert first.request_id == "again" and first.booking_id
        assert (await cleanup(nc, "again", "free")).known
        second = await select(nc, request_id="again")
        assert second.request_id == "again" and second.booking_id not in ("", first.booking_id)
        assert app.states[POOL].tracker.bookings_of("again") == [second.booking_id] and not app.states[POOL].provisional
        assert (await cleanup(nc, "again", "prefill_complete")).known
        assert (await cleanup(nc, "again", "free")).known
        assert app.states[POOL].tracker.request_ids() == []
        assert (await nc.jetstream().stream_info(NAMES.bookings_stream)).state.messages == 5
        dry = await select(nc, request_id="dry", book=False)
        assert dry.request_id == "dry" and dry.booking_id == ""


async def test_a_free_before_the_booking_cancels_it_on_every_replica(nats_url, nc, indexer):
    # The bridge gave up on a select and freed its booking before the (late) select booked it.
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        req = CleanupRequest(request_id="late", phase="free", booking_id="b-late")
        assert not (await request(nc, NAMES.booking(POOL), req, CleanupReply)).known
        late = await select(nc, request_id="late", booking_id="b-late")
        assert late.booking_id == "" and not app.states[POOL].tracker.is_active("late") and not app.states[POOL].provisional
        # A new attempt of the same request id books; a replica started now replays the same.
        again = await select(nc, request_id="late", booking_id="b-next")
        assert again.booking_id == "b-next"
        async with running_scheduler(nats_url, "--router-id", "s2") as other:
            await eventually(lambda: other.states[POOL].tracker.digest() == app.states[POOL].tracker.digest())
            assert other.states[POOL].tracker.bookings_of("late") == ["b-next"]
        # A free naming another booking of a known request leaves the booked one alone.
        assert not (await request(nc, NAMES.booking(POOL), req, CleanupReply)).known
        assert app.states[POOL].tracker.bookings_of("late") == ["b-next"]


async def test_a_retried_select_of_one_booking_on_two_replicas_books_it_once(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as a, running_scheduler(nats_url, "--router-id", "s2") as b:
        await put(nc, 1)
        await put(nc, 2)
        await eventually(lambda: worker_ids(a) == worker_ids(b) == {1, 2})
        req = SelectRequest(request_id="twice", token_ids=TOKENS, booking_id="b-1")
        r1, r2 = await asyncio.gather(a.select(POOL, req), b.select(POOL, req))
        assert r1.booking_id == r2.booking_id == "b-1" and r1.decode.worker_id == r2.decode.worker_id
        await eventually(lambda: a.states[POOL].tracker.digest() == b.states[POOL].tracker.digest())
        assert [leg.booking_id for leg in a.states[POOL].tracker.legs_of("twice")] == ["b-1"]
        assert (await b.booking(POOL, CleanupRequest(request_id="twice", phase="free"))).known
        await eventually(lambda: not a.states[POOL].tracker.is_active("twice"))


async def test_unconfirmed_bookings_expire_after_the_short_window_confirmed_ones_keep_the_ttl(nats_url, nc, indexer):
    flags = ("--booking-unconfirmed-ttl-s", "1", "--booking-ttl-s", "60", "--expiry-sweep-s", "0.1")
    async with running_scheduler(nats_url, "--router-id", "s1", *flags) as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        await select(nc, request_id="abandoned")
        await select(nc, request_id="running")
        assert (await cleanup(nc, "running", "prefill_complete")).known
        await eventually(lambda: app.states[POOL].tracker.request_ids() == ["running"], 3)
        assert not (await cleanup(nc, "abandoned", "prefill_complete")).known  # too late
        # A replica that starts now replays both adds and the prefill_complete: the same view.
        async with running_scheduler(nats_url, "--router-id", "s2", *flags) as other:
            assert other.states[POOL].tracker.request_ids() == ["running"]
            assert other.states[POOL].tracker.digest() == app.states[POOL].tracker.digest()
        assert (await cleanup(nc, "running", "free")).known


async def test_a_cleanup_while_this_replica_is_still_booking_lands_after_the_add(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "s1") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        for phase in ("free", "prefill_complete"):
            rid = f"racing-{phase}"
            booking = asyncio.create_task(app.select(POOL, SelectRequest(request_id=rid, token_ids=TOKENS)))
            while not app.states[POOL].tracker.is_active(rid):  # the add is provisional, its publish in flight
                await asyncio.sleep(0)
            reply = await app.booking(POOL, CleanupRequest(request_id=rid, phase=phase))
            assert reply.known and (await booking).booking_id
            legs = app.states[POOL].tracker.legs_of(rid)
            assert (legs == []) if phase == "free" else (len(legs) == 1 and legs[0].confirmed)


async def test_a_replica_behind_the_bookings_stream_asks_for_a_retry_instead_of_dropping_a_free(nats_url, nc, indexer):
    """Its feed stalled (right after a NATS restart, found by tests/faults/) while another replica
    booked: a free of that request must not be answered "unknown" (the caller would stop, and the
    booking would stay for its TTL once the feed resumes). It answers `timeout`: retry."""
    from schemas.bookings import booking_msg_id

    async with running_scheduler(nats_url, "--router-id", "s1", "--booking-sync-timeout-s", "0.5") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        assert app.follower is not None
        await app.follower.stop()  # a stalled feed: nothing more is applied here
        add = BookingAdd(request_id="elsewhere", router_id="s2", pool=POOL, worker_id=1, ts_ms=now_ms(), isl_tokens=64,
                         sequence_hashes=[1, 2, 3, 4], block_size=16, booking_id="b-9")
        await nc.jetstream().publish(NAMES.bookings_subject(POOL, "s2"), codec.encode_json(add),
                                     headers={"Nats-Msg-Id": booking_msg_id(POOL, "elsewhere", "add", "", "b-9")})
        with pytest.raises(RemoteError) as err:
            await cleanup(nc, "elsewhere", "free")
        assert err.value.code == "timeout" and "not applied the bookings stream" in err.value.message
        # A request nobody booked, on a replica that is up to date, is still simply unknown.
    async with running_scheduler(nats_url, "--router-id", "s3") as fresh:
        await eventually(lambda: fresh.states[POOL].tracker.is_active("elsewhere"))
        assert not (await cleanup(nc, "nobody", "free")).known
        assert (await cleanup(nc, "elsewhere", "free")).known


async def test_digest_reports_the_load_view_and_the_own_index_replica(nats_url, nc):
    """`GET /digest` (what the fault suite compares) with an own index replica: the load view's
    digest and bookings per pool, and the index replica's digests."""
    async with running_scheduler(nats_url, "--router-id", "dg", "--embedded-indexer", "true") as app:
        await put(nc, 1)
        await eventually(lambda: worker_ids(app) == {1})
        await select(nc, request_id="d-1")
        out = app.digest()
        assert out["router_id"] == "dg" and out["pools"][POOL]["bookings"] == 1 and out["pools"][POOL]["load"]
        assert "pools" in out["index"] and "applied_seq" in out["index"]
