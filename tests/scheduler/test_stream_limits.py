"""A full bookings stream (discard new) refuses bookings explicitly: `select` answers `overloaded`,
nothing is booked, and everything booked before stays."""

from __future__ import annotations

import asyncio

from schemas.api import SelectReply, SelectRequest
from schemas.codec import RemoteError
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
