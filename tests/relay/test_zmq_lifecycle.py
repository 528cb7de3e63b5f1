"""The relay leaves no ZMQ socket or context open, whichever way it ends: a start that fails on a
malformed endpoint (after other sockets opened), a normal stop, a stop that is itself cancelled.
`Context.term()` blocks the calling thread (for the relay, its event loop) while any socket of the
context is open, so one leaked socket hangs the process that stops, or the test worker that
garbage-collects the context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import zmq
import zmq.asyncio

from services.relay.app import RelayApp
from services.relay.ingest import RankIntake
from services.relay.plane import PlaneIntake
from services.runtime.natsio import connect, provision
from services.runtime.service import Runtime, stream_settings

from .helpers import ports, relay_cfg

BAD = "tcp://127.0.0.1:notaport"  # ZMQ refuses it at connect(): EINVAL


class RecordingContext(zmq.asyncio.Context):
    """A context that remembers every socket it made, to check that each one was closed."""

    made: list[zmq.asyncio.Socket] = []  # declared on the class: zmq takes unknown attributes for options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made: list[zmq.asyncio.Socket] = []

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(socket_type, *args, **kwargs)
        self.made.append(sock)
        return sock


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordingContext]]:
    """The relay's contexts (it makes `zmq.asyncio.Context()`), recorded."""
    made: list[RecordingContext] = []

    def factory(*args: Any, **kwargs: Any) -> RecordingContext:
        ctx = RecordingContext(*args, **kwargs)
        made.append(ctx)
        return ctx

    monkeypatch.setattr("services.relay.app.zmq.asyncio.Context", factory)
    yield made


def open_sockets(ctx: RecordingContext) -> list[zmq.asyncio.Socket]:
    return [s for s in ctx.made if not s.closed]


def noop(*_args: object) -> None:
    return None


# --- the intakes (no NATS) -------------------------------------------------------------------------


async def test_a_plane_intake_whose_endpoint_is_malformed_closes_its_socket() -> None:
    (port,) = ports(1)
    ctx = RecordingContext()
    try:
        plane = PlaneIntake(ctx, [f"tcp://127.0.0.1:{port}", BAD], {0}, 1, topic="", events=noop, clear=noop)
        with pytest.raises(zmq.ZMQError):
            plane.start()  # the first endpoint was connected when the second failed
        assert len(ctx.made) == 1 and open_sockets(ctx) == []
        assert plane.sub is None and plane._task is None
    finally:
        ctx.destroy(linger=0)


async def test_a_rank_intake_whose_endpoint_is_malformed_closes_its_socket() -> None:
    ctx = RecordingContext()
    try:
        intake = RankIntake(ctx, 0, BAD, None, topic="", apply=noop, clear=noop)
        with pytest.raises(zmq.ZMQError):
            intake.start()
        assert len(ctx.made) == 1 and open_sockets(ctx) == []
        assert intake.sub is None
    finally:
        ctx.destroy(linger=0)


async def test_a_replay_endpoint_that_is_malformed_closes_its_dealer() -> None:
    ctx = RecordingContext()
    try:
        intake = RankIntake(ctx, 0, "tcp://127.0.0.1:1", BAD, topic="", apply=noop, clear=noop)
        with pytest.raises(zmq.ZMQError):
            await intake._fetch_replay(0)
        assert len(ctx.made) == 1 and open_sockets(ctx) == []
    finally:
        ctx.destroy(linger=0)


# --- the relay (real nats-server) ------------------------------------------------------------------


async def relay_runtime(cfg: Any) -> Runtime:
    nc = await connect(cfg.nats_url, "test-relay", max_wait_s=10)
    rt = Runtime("relay", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    return rt


@pytest.mark.parametrize("source", ["vllm", "dynamo"])
async def test_a_relay_whose_start_fails_leaves_no_socket_and_a_closed_context(
    nats_url: str, recording: list[RecordingContext], source: str
) -> None:
    # Two ranks (vllm: one socket each, the first started when the second fails) or one socket
    # for both endpoints (dynamo: the first connected when the second fails).
    zp, _ = ports()
    cfg = relay_cfg(nats_url, zp, None, "--zmq", BAD, "--dp-size", "2", "--source", source)
    rt = await relay_runtime(cfg)
    app = RelayApp(cfg)
    try:
        with pytest.raises(zmq.ZMQError):
            await app.start(rt)
        (ctx,) = recording
        assert ctx.made and open_sockets(ctx) == []
        assert ctx.closed and app.ctx is ctx
        assert all(i._task is None or i._task.done() for i in app.intakes)  # the started rank's loop is gone
        await asyncio.wait_for(app.stop(), 15)  # what `kvr relay` does next: returns, idempotent
    finally:
        await rt.nc.close()


@asynccontextmanager
async def started_relay(nats_url: str, recording: list[RecordingContext]) -> AsyncIterator[tuple[RelayApp, RecordingContext]]:
    zp, rp = ports()
    rt = await relay_runtime(relay_cfg(nats_url, zp, rp))
    app = RelayApp(rt.cfg)  # type: ignore[arg-type]
    try:
        await app.start(rt)
        (ctx,) = recording
        yield app, ctx
    finally:
        await rt.nc.close()


async def test_a_relay_that_stops_closes_every_socket_and_its_context(nats_url: str, recording: list[RecordingContext]) -> None:
    async with started_relay(nats_url, recording) as (app, ctx):
        assert open_sockets(ctx)
        await app.stop()
        assert open_sockets(ctx) == [] and ctx.closed


async def test_a_relay_whose_stop_is_cancelled_still_closes_its_sockets_and_context(
    nats_url: str, recording: list[RecordingContext]
) -> None:
    async with started_relay(nats_url, recording) as (app, ctx):
        stopping = asyncio.create_task(app.stop())
        await asyncio.sleep(0)  # inside the stop: waiting for the intake's task to go
        stopping.cancel()  # e.g. the runtime's stop timeout
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert open_sockets(ctx) == [] and ctx.closed
        await asyncio.wait_for(app.stop(), 15)  # the rest of the stop, once more
