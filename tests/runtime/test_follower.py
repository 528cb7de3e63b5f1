"""StreamFollower against real nats-server processes: byte-bounded pulls, caught-up from the server's
account, readiness while disconnected or lagging, history loss, rewind."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from services.runtime.embedded import NatsServer
from services.runtime.follower import StreamFollower, parse_ack_reply


def varz(server: NatsServer) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def tight_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server that drops a client as a slow consumer once 4 MB wait to be written to it."""
    conf = tmp_path / "tight.conf"
    conf.write_text("max_pending: 4MB\nwrite_deadline: \"2s\"\n")
    server = NatsServer(extra_args=["-c", str(conf)]).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def tight_nc(tight_server: NatsServer) -> AsyncIterator:
    conn = await nats.connect(tight_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, pending_size=64 * 1024 * 1024)
    try:
        yield conn
    finally:
        await conn.close()


async def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_ack_reply_parsing_both_forms() -> None:
    assert parse_ack_reply("$JS.ACK.S.C.1.42.7.1796284983178288068.3") == (42, 3, 1796284983178288068)
    assert parse_ack_reply("$JS.ACK.dom.HASH.S.C.1.42.7.1796284983178288068.3.tok") == (42, 3, 1796284983178288068)
    assert parse_ack_reply("$JS.ACK.S.C") is None


async def test_backlog_of_large_messages_never_trips_the_slow_consumer_limit(tight_server, tight_nc) -> None:
    """The bug: 1,024-message fetches without a byte limit got the indexer dropped as a slow consumer
    and a fetch timeout made it 'ready' half way. Here 24 MB of 600 KB messages wait in the stream of
    a server with a 4 MB slow-consumer limit, and the follower applies slowly."""
    js = tight_nc.jetstream()
    await js.add_stream(StreamConfig(name="BIG", subjects=["big.>"]))
    payload = b"x" * 600_000
    n = 40
    for i in range(n):
        await js.publish(f"big.{i % 3}", payload + str(i).encode())
    seen: list[int] = []
    caught_up_during: list[bool] = []
    follower: StreamFollower

    def apply(seq: int, _subject: str, data: bytes, _headers) -> None:
        caught_up_during.append(follower.caught_up.is_set())
        time.sleep(0.01)  # a slow fold: the server would pile messages up for us without a byte bound
        seen.append(int(data[600_000:]))

    follower = StreamFollower(tight_nc, "BIG", ["big.>"], apply, batch=1024, max_bytes=1_000_000, name="big")
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 30)
        assert seen == list(range(n))
        assert not any(caught_up_during)  # never "caught up" before the last message was applied
        assert follower.resets == 0
        assert varz(tight_server)["slow_consumers"] == 0
        assert follower.ready()
        # a message larger than the configured budget still comes through (budget ≥ max_payload)
        await js.publish("big.x", payload + b"99")
        await wait_for(lambda: seen[-1] == 99)
    finally:
        await follower.stop()


async def test_caught_up_when_the_filter_matches_nothing_or_the_stream_is_empty(nc) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="MIX", subjects=["mix.>"]))
    empty = StreamFollower(nc, "MIX", ["mix.a"], lambda *a: None, name="empty")
    empty.start()
    await asyncio.wait_for(empty.caught_up.wait(), 5)
    for _ in range(20):
        await js.publish("mix.b", b"other pool")
    seen: list[int] = []
    filtered = StreamFollower(nc, "MIX", ["mix.a"], lambda s, *_: seen.append(s), name="filtered")
    filtered.start()
    try:
        await asyncio.wait_for(filtered.caught_up.wait(), 5)
        assert seen == [] and filtered.ready()
        ack = await js.publish("mix.a", b"mine")
        await wait_for(lambda: seen == [ack.seq])
    finally:
        await empty.stop()
        await filtered.stop()


async def test_readiness_follows_lag_and_the_connection(nats_server, nc) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="R", subjects=["r.>"]))
    seen: list[int] = []
    follower = StreamFollower(nc, "R", ["r.>"], lambda s, *_: seen.append(s), max_lag_s=0.5, poll_interval_s=0.1, name="r")
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 5)
        assert follower.ready()
        follower.pause()
        for i in range(5):
            await js.publish("r.x", str(i).encode())
        await wait_for(lambda: not follower.ready(), 5)  # stuck with messages pending → lagging
        assert follower.pending > 0 and follower.lag_s() > 0.5
        follower.resume()
        await wait_for(lambda: follower.ready() and len(seen) == 5, 5)
        assert follower.lag_s() == 0.0

        nats_server.stop()
        await wait_for(lambda: not nc.is_connected, 10)
        assert not follower.ready()
        nats_server.start()
        await wait_for(lambda: nc.is_connected, 15)
        await js.publish("r.x", b"after")
        await wait_for(lambda: follower.ready() and len(seen) == 6, 15)
    finally:
        await follower.stop()


async def test_messages_dropped_before_they_were_read_are_reported(nc) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="H", subjects=["h.>"], max_msgs=10, discard=DiscardPolicy.OLD))
    for i in range(5):
        await js.publish("h.x", str(i).encode())
    seen: list[int] = []
    lost: list[tuple[int, int]] = []
    follower = StreamFollower(
        nc, "H", ["h.>"], lambda s, *_: seen.append(s), batch=2, poll_interval_s=0.1, name="h",
        on_history_lost=lambda a, b: lost.append((a, b)),
    )
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 5)
        assert lost == []  # a follower starting from 1 takes what the stream holds
        follower.pause()
        await asyncio.sleep(0.3)
        for i in range(5, 30):
            await js.publish("h.x", str(i).encode())  # the stream keeps only the last 10: 21..30
        follower.resume()
        await wait_for(lambda: seen and seen[-1] == 30, 5)
        # the pull open at the pause (2 messages at most) was delivered; the rest is gone
        k = seen.index(21) if 21 in seen else len(seen)
        assert 5 <= k <= 7 and seen == [*range(1, k + 1), *range(21, 31)]
        assert lost == [(k + 1, 20 - k)]
        assert follower.history_lost == 20 - k
    finally:
        await follower.stop()


async def test_a_follower_resuming_after_a_snapshot_reports_what_the_stream_no_longer_has(nc) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="G", subjects=["g.>"], max_msgs=5, discard=DiscardPolicy.OLD))
    for i in range(20):
        await js.publish("g.x", str(i).encode())
    lost: list[tuple[int, int]] = []
    follower = StreamFollower(nc, "G", ["g.>"], lambda *a: None, start_seq=8, poll_interval_s=0.1, on_history_lost=lambda a, b: lost.append((a, b)))
    follower.start()
    try:
        await wait_for(lambda: bool(lost), 5)
        assert lost == [(8, 8)]  # wanted 8.., the stream starts at 16
    finally:
        await follower.stop()


async def test_rewind_reads_again_from_a_sequence_in_order(nc) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="W", subjects=["w.>"]))
    for i in range(10):
        await js.publish(f"w.{i % 2}", str(i).encode())
    seen: list[int] = []
    follower = StreamFollower(nc, "W", ["w.>"], lambda s, *_: seen.append(s), name="w")
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 5)
        follower.rewind(4)
        assert follower.replaying
        await wait_for(lambda: len(seen) == 17, 5)
        assert seen == [*range(1, 11), *range(4, 11)]
        await wait_for(lambda: not follower.replaying, 5)
        assert follower.ready()
        await js.publish("w.0", b"x")
        await wait_for(lambda: seen[-1] == 11, 5)
    finally:
        await follower.stop()


async def test_one_pull_at_a_time_even_when_batches_complete_by_count(nc) -> None:
    """A batch filled by count is followed by the server's 'Batch Completed' status: it must not end
    the next pull early (which would leave pulls open on the server, each worth max_bytes)."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="B1", subjects=["b1.>"]))
    for i in range(60):
        await js.publish("b1.x", str(i).encode())
    seen: list[int] = []
    follower = StreamFollower(nc, "B1", ["b1.>"], lambda s, *_: seen.append(s), batch=2, name="b1")
    follower.start()
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 10)
        assert seen == list(range(1, 61))
        waiting = []
        for _ in range(10):
            info = await js.consumer_info("B1", follower._consumer)
            waiting.append(info.num_waiting)
            await asyncio.sleep(0.05)
        assert max(waiting) <= 1, waiting
    finally:
        await follower.stop()
