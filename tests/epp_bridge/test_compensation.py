"""A booking whose client gave up at the bridge's deadline is reclaimed: the real bridge and the real
scheduler on a real nats-server, with an indexer that answers too late.

The bridge used to free the request id at 0, 0.5 and 2 s after its deadline and stop at the first
"known"; a select that booked after the last attempt (an overloaded or slow scheduler) kept its
booking until the 300 s TTL. Now the bridge frees the select's own booking once, and that free
also cancels the booking in the stream, so the late add books nothing on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from prometheus_client import REGISTRY

from schemas import codec
from schemas.api import MatchReply, MatchRequest
from schemas.bookings import BookingAdd, BookingEvent, BookingFree
from services.runtime.responder import serve
from tests.scheduler.conftest import NAMES, POOL, running_scheduler

from .helpers import record, register, start_bridge


def compensations(outcome: str) -> float:
    return REGISTRY.get_sample_value("kvr_epp_compensating_frees_total", {"outcome": outcome}) or 0.0


async def bookings_stream(nc: Any) -> list[Any]:
    js = nc.jetstream()
    info = await js.stream_info(NAMES.bookings_stream)
    return [codec.decode((await js.get_msg(NAMES.bookings_stream, s)).data, BookingEvent)
            for s in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages]


async def test_a_select_that_books_after_the_bridge_gave_up_books_nothing(nats_url, nc):
    matched = asyncio.Event()

    async def slow_match(req: MatchRequest, _msg: Any) -> MatchReply:
        await asyncio.sleep(3.0)  # later than every compensation attempt of the old bridge
        matched.set()
        return MatchReply(block_size=4, scores=[], tier_scores={}, tree_sizes=[], stream_seq=0)

    sub = await serve(nc, NAMES.match(POOL), MatchRequest, slow_match, queue="indexer", max_inflight=8)
    cancelled = compensations("cancelled")
    async with running_scheduler(nats_url, "--router-id", "s1", "--match-timeout-s", "10", "--block-size", "4") as app:
        await register(nc, [record(1), record(2)])
        bridge = await start_bridge(nc, nats_url, "--pool", POOL, "--epp-select-timeout-s", "0.3")
        try:
            for _ in range(100):
                if len(app.candidates(POOL)) == 2 and len(bridge.watcher.directory.live(POOL)) == 2:
                    break
                await asyncio.sleep(0.02)
            query = {"request_id": "gave-up", "body": {"prompt": [1] * 8}}
            msg = await nc.request(NAMES.epp_query(POOL), codec.encode_json(query), timeout=5)
            assert b'"timeout"' in msg.data
            await asyncio.wait_for(matched.wait(), 5)
            for _ in range(100):  # the late select publishes its add and applies it from the stream
                events = await bookings_stream(nc)
                if any(isinstance(e, BookingAdd) for e in events):
                    break
                await asyncio.sleep(0.05)
            kinds = [(type(e).__name__, e.request_id, e.booking_id) for e in events]
            free, add = kinds
            assert free[0] == BookingFree.__name__ and add[0] == BookingAdd.__name__  # the cancel came first
            assert free[1:] == add[1:] == ("gave-up", add[2]) and add[2]
            assert app.states[POOL].tracker.request_ids() == [] and app.export_state(POOL).bookings == []
            assert compensations("cancelled") - cancelled == 1
        finally:
            await bridge.stop()
            await sub.unsubscribe()


async def test_an_ext_proc_stream_gone_mid_decision_cancels_its_late_booking(nats_url, nc):
    import grpc

    from services.epp_bridge.extproc_client import ExtProcClient
    from services.runtime.embedded import free_port

    asked, release = asyncio.Event(), asyncio.Event()

    async def held_match(req: MatchRequest, _msg: Any) -> MatchReply:
        asked.set()
        await release.wait()  # the decision is under way until the test lets it finish
        return MatchReply(block_size=4, scores=[], tier_scores={}, tree_sizes=[], stream_seq=0)

    sub = await serve(nc, NAMES.match(POOL), MatchRequest, held_match, queue="indexer", max_inflight=8)
    port = free_port()
    async with running_scheduler(nats_url, "--router-id", "s1", "--match-timeout-s", "10", "--block-size", "4") as app:
        await register(nc, [record(1), record(2)])
        bridge = await start_bridge(nc, nats_url, "--pool", POOL, "--grpc-port", str(port), "--epp-select-timeout-s", "10")
        client = ExtProcClient(f"127.0.0.1:{port}")
        try:
            for _ in range(100):
                if len(app.candidates(POOL)) == 2 and len(bridge.watcher.directory.live(POOL)) == 2:
                    break
                await asyncio.sleep(0.02)
            stream = client.stream()
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "nvext": {"token_data": [1] * 8}})
            deciding = asyncio.create_task(stream.request(body.encode()))
            await asyncio.wait_for(asked.wait(), 5)
            stream.cancel()  # the client went away while the scheduler decides
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await deciding
            await asyncio.sleep(0.3)  # the stream's compensation reaches the scheduler first
            release.set()
            for _ in range(100):
                events = await bookings_stream(nc)
                if any(isinstance(e, BookingAdd) for e in events):
                    break
                await asyncio.sleep(0.05)
            (free, add) = events
            assert isinstance(free, BookingFree) and isinstance(add, BookingAdd) and free.booking_id == add.booking_id != ""
            assert app.states[POOL].tracker.request_ids() == []
        finally:
            await client.close()
            await bridge.stop()
            await sub.unsubscribe()


async def test_a_scheduler_that_answers_timeout_gets_its_booking_cancelled(nats_url, nc):
    """`timeout` from the scheduler means its bookings stream did not acknowledge the add in time
    (no leader, found by tests/faults/), which may still have stored it: the bridge frees exactly
    that booking, as after its own deadline. Other errors book nothing and are not followed up."""
    from schemas.api import CleanupReply, CleanupRequest, SelectRequest
    from services.runtime.responder import ServiceError

    answers = iter([("timeout", "the bookings stream has no leader"), ("no_workers", "nobody")])
    selects: list[SelectRequest] = []
    frees: list[CleanupRequest] = []

    async def scripted_select(req: SelectRequest, _msg: Any) -> None:
        selects.append(req)
        code, message = next(answers)
        raise ServiceError(code, message)

    async def record_free(req: CleanupRequest, _msg: Any) -> CleanupReply:
        frees.append(req)
        return CleanupReply(request_id=req.request_id, known=False)

    subs = [await serve(nc, NAMES.select(POOL), SelectRequest, scripted_select, queue="scheduler"),
            await serve(nc, NAMES.booking(POOL), CleanupRequest, record_free, queue="scheduler")]
    bridge = await start_bridge(nc, nats_url, "--pool", POOL)
    await register(nc, [record(1)])
    try:
        for _ in range(100):
            if bridge.watcher.directory.live(POOL):
                break
            await asyncio.sleep(0.02)
        for rid, code in (("q-timeout", "timeout"), ("q-none", "no_workers")):
            query = {"request_id": rid, "body": {"prompt": [1] * 8}}
            reply = json.loads((await nc.request(NAMES.epp_query(POOL), codec.encode_json(query), timeout=5)).data)
            assert reply["error"]["code"] == code
        for _ in range(100):
            if frees:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert [(f.request_id, f.phase, f.booking_id) for f in frees] == [("q-timeout", "free", selects[0].booking_id)]
        assert selects[0].booking_id and selects[1].booking_id
    finally:
        await bridge.stop()
        for sub in subs:
            await sub.unsubscribe()
