"""A full bookings stream (discard new) refuses bookings explicitly: `select` answers `overloaded`,
nothing is booked, and everything booked before stays."""

from __future__ import annotations

import asyncio

from schemas.api import SelectReply, SelectRequest
from schemas.codec import RemoteError
from services.runtime.natsio import StreamSettings, provision
from services.runtime.responder import request
from services.runtime.workers import now_ms, put_worker

from .conftest import NAMES, POOL, running_scheduler
from .helpers import record


async def test_a_full_bookings_stream_refuses_with_overloaded_and_keeps_what_it_holds(nats_url, nc, indexer) -> None:
    async with running_scheduler(nats_url, "--bookings-max-bytes", "6000") as app:
        await put_worker(nc, NAMES.workers_bucket, record(1, ttl_s=3600, heartbeat_ms=now_ms()))
        while not app.candidates(POOL):
            await asyncio.sleep(0.02)
        booked: list[str] = []
        refused = None
        for i in range(40):
            req = SelectRequest(request_id=f"r-{i}", block_hashes=list(range(1, 30)), book=True)
            try:
                await request(nc, NAMES.select(POOL), req, SelectReply)
                booked.append(req.request_id)
            except RemoteError as err:
                refused = err
                break
        assert refused is not None and refused.code == "overloaded" and "bookings stream is full" in refused.message
        assert booked, "some bookings fit before the stream was full"
        state = app.export_state(POOL)
        assert state.bookings == sorted(booked)  # the refused one left nothing behind, the others stay
        info = await nc.jetstream().stream_info(NAMES.bookings_stream)
        assert info.state.first_seq == 1 and info.state.messages == len(booked)


async def test_a_bookings_stream_without_a_leader_answers_timeout_and_books_nothing(nats_url, nc, indexer) -> None:
    """While the bookings stream cannot take a message (here: gone; in a cluster: electing a leader,
    found by tests/faults/), `select` answers `timeout` (it was `internal`) and leaves no load behind;
    a blip shorter than --booking-sync-timeout-s is ridden out by retrying the same message."""
    from prometheus_client import REGISTRY

    def unrecorded() -> float:
        return REGISTRY.get_sample_value("kvr_scheduler_bookings_unrecorded_total") or 0.0

    async with running_scheduler(nats_url, "--booking-sync-timeout-s", "1.5") as app:
        await put_worker(nc, NAMES.workers_bucket, record(1, ttl_s=3600, heartbeat_ms=now_ms()))
        while not app.candidates(POOL):
            await asyncio.sleep(0.02)
        js = nc.jetstream()
        before = unrecorded()
        await js.delete_stream(NAMES.bookings_stream)
        req = SelectRequest(request_id="r-gone", block_hashes=[1, 2, 3], book=True)
        try:
            await request(nc, NAMES.select(POOL), req, SelectReply, timeout=5)
            raise AssertionError("booked without a bookings stream")
        except RemoteError as err:
            assert err.code == "timeout" and "no leader" in err.message, err
        assert unrecorded() - before == 1
        assert app.export_state(POOL).bookings == [] and not app.states[POOL].tracker.request_ids()

        # The stream comes back 0.5 s into the next select: the retried add is recorded once.
        async def back() -> None:
            await asyncio.sleep(0.5)
            await provision(js, NAMES, StreamSettings())

        restore = asyncio.create_task(back())
        reply = await request(nc, NAMES.select(POOL), SelectRequest(request_id="r-back", block_hashes=[1, 2], book=True),
                              SelectReply, timeout=5)
        await restore
        assert reply.decode.worker_id == 1 and reply.booking_id
        info = await js.stream_info(NAMES.bookings_stream)
        assert info.state.messages == 1
