"""Three scheduler replicas as processes on one real nats-server share one load view.

Bookings, frees and prefill completions go through the queue group (so through different
replicas); every replica's exported view must be identical, also after a replica is killed and a
new one replays the stream, after a worker leaves, and after the bookings' TTL has passed.
"""

from __future__ import annotations

import asyncio
import time

from schemas import codec
from schemas.api import CleanupReply, CleanupRequest, SelectReply, SelectRequest
from schemas.events import kv_msg_id, stored_event
from schemas.hashing import local_block_hashes
from services.runtime.natsio import StreamSettings, provision
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request
from services.runtime.workers import delete_worker, put_worker

from .conftest import NAMES, POOL, states_of_all
from .helpers import record

TTL_S = 8.0


def replica(nats_url: str, rid: str, log_dir) -> ServiceProcess:
    return ServiceProcess(
        "scheduler",
        # Overlaps from the indexer process over NATS (the remote-index layout).
        args=["--router-id", rid, "--booking-ttl-s", str(TTL_S), "--expiry-sweep-s", "0.2", "--embedded-indexer", "false"],
        nats_url=nats_url,
        pools=[POOL],
        log_path=str(log_dir / f"{rid}.log"),
    )


async def converged(nc, n: int, timeout: float = 5.0, until=lambda states: True):
    """Wait until all replicas report the same view and that view satisfies `until` (events such as a
    discovery delete reach the replicas asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = await states_of_all(nc, n)
        if len({(s.digest, tuple(s.bookings), s.stream_seq) for s in states}) == 1 and until(states):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas differ: {[(s.router_id, s.digest, len(s.bookings), s.stream_seq) for s in states]}")
        await asyncio.sleep(0.05)


async def test_replicas_converge_through_bookings_restart_removal_and_expiry(nats_url, nc, tmp_path):
    await provision(nc.jetstream(), NAMES, StreamSettings())
    for wid in (1, 2, 3):
        await put_worker(nc, NAMES.workers_bucket, record(wid, pool=POOL, heartbeat_ms=int(time.time() * 1000), ttl_s=60))
    # The real indexer process, holding a few blocks of the prompts' shared first block on worker 1.
    js = nc.jetstream()
    for i in range(5):
        ev = stored_event(1, i + 1, [(500 + i, local_block_hashes([i] * 16, 16)[0])])
        await js.publish(NAMES.kv_subject(POOL, 1, 0), codec.encode_json(ev), headers={"Nats-Msg-Id": kv_msg_id(POOL, 1, 0, i + 1)})
    procs = {"indexer": ServiceProcess("indexer", nats_url=nats_url, pools=[POOL], log_path=str(tmp_path / "indexer.log")).start()}
    procs.update({rid: replica(nats_url, rid, tmp_path).start() for rid in ("s1", "s2", "s3")})
    try:
        for p in procs.values():
            await asyncio.to_thread(p.wait_ready, 30)
        hits = 0
        for i in range(30):
            tokens = [i % 5] * 16 + list(range(100 + i, 148 + i))
            reply = await request(nc, NAMES.select(POOL), SelectRequest(request_id=f"r{i}", token_ids=tokens), SelectReply, timeout=5)
            assert reply.decode.worker_id in (1, 2, 3)
            hits += reply.overlap_blocks
        assert hits > 0  # overlaps came from the live indexer
        info = await nc.jetstream().stream_info(NAMES.bookings_stream, subjects_filter=">")
        publishers = {subject.rsplit(".", 1)[1] for subject in (info.state.subjects or {})}
        assert publishers == {"s1", "s2", "s3"}, publishers  # the queue group spread the bookings

        states = await converged(nc, 3)
        assert [s.router_id for s in states] == ["s1", "s2", "s3"]
        assert len(states[0].bookings) == 30 and states[0].loads and states[0].digest

        for i in range(0, 10):
            assert (await request(nc, NAMES.booking(POOL), CleanupRequest(request_id=f"r{i}", phase="free"), CleanupReply)).known
        for i in range(10, 20):
            rq = CleanupRequest(request_id=f"r{i}", phase="prefill_complete")
            assert (await request(nc, NAMES.booking(POOL), rq, CleanupReply)).known
        states = await converged(nc, 3)
        assert len(states[0].bookings) == 20
        assert sum(lo.active_requests for lo in states[0].loads) == 20

        # Kill one replica hard; a new one replays the stream and joins the same view.
        procs["s2"].kill()
        procs["s4"] = replica(nats_url, "s4", tmp_path).start()
        await asyncio.to_thread(procs["s4"].wait_ready, 30)
        states = await converged(nc, 3)
        assert [s.router_id for s in states] == ["s1", "s3", "s4"] and len(states[0].bookings) == 20

        # A worker leaving drops its bookings on every replica.
        on_3 = {lo.worker_id for lo in states[0].loads}
        await delete_worker(nc, NAMES.workers_bucket, POOL, 3)
        states = await converged(nc, 3, timeout=10, until=lambda st: st[0].workers == [1, 2])
        assert 3 not in {lo.worker_id for lo in states[0].loads} and states[0].workers == [1, 2]
        assert on_3  # (there was load to drop or keep)

        # Past the booking TTL every replica has expired everything, identically.
        await asyncio.sleep(TTL_S)
        states = await converged(nc, 3)
        assert states[0].bookings == [] and states[0].loads == []
        text = "\n".join(procs[r].metrics() for r in ("s1", "s3", "s4"))
        for name in ("kvr_scheduler_decisions_total", "kvr_scheduler_kv_hit_ratio_bucket", "kvr_scheduler_phase_seconds_bucket",
                     "kvr_scheduler_booking_lag_seconds_bucket", "kvr_scheduler_bookings_expired_total",
                     "kvr_scheduler_bookings_worker_removed_total", "kvr_scheduler_workers"):
            assert name in text, name
        assert 'outcome="ok"' in text
        assert procs["s1"].terminate() == 0  # SIGTERM drains and exits 0
    finally:
        for p in procs.values():
            p.terminate()
