"""Replicas converge; a SIGKILLed indexer restores from snapshot + stream tail without loss or double apply."""

from __future__ import annotations

import asyncio

from schemas.api import DumpReply, DumpRequest
from schemas.discovery import WorkerRecord
from services.indexer import snapshot
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request
from services.runtime.workers import delete_worker, put_worker

from .conftest import NAMES, publish, wait_for
from .workload import Workload


async def test_two_replicas_reach_identical_dumps(nc, start_indexer):
    js = nc.jetstream()
    a = await start_indexer(serve_endpoints=False, snapshot_every_events=0, snapshot_interval_s=0)
    wl = Workload(seed=1)
    for _ in range(60):
        await publish(js, "p", wl.message())
    b = await start_indexer(serve_endpoints=False, snapshot_every_events=0, snapshot_interval_s=0)  # starts late
    for _ in range(60):
        seq = await publish(js, "p", wl.message())
    await wait_for(lambda: a.applied_seq >= seq and b.applied_seq >= seq)
    assert a.index("p").blocks > 0
    assert a.dump("p") == b.dump("p")
    assert a.index("p").counters == b.index("p").counters


def _wait_ready(proc: ServiceProcess) -> None:
    proc.wait_ready(timeout=60)


def _status(proc: ServiceProcess) -> dict:
    """/readyz body; {} when the loaded machine makes the probe time out."""
    try:
        return proc.readyz()
    except OSError:
        return {}


async def _dump(nc) -> DumpReply:
    return await request(nc, NAMES.dump("p"), DumpRequest(), DumpReply, timeout=5)


async def test_sigkill_restart_restores_snapshot_plus_tail(nats_url, nc, tmp_path):
    js = nc.jetstream()
    common = dict(nats_url=nats_url, pools=["p"])
    snap_args = ["--snapshot-every-events", "25", "--snapshot-interval-s", "0.3"]
    a = ServiceProcess("indexer", args=snap_args, log_path=str(tmp_path / "a.log"), **common).start()
    b = ServiceProcess("indexer", args=["--snapshot-every-events", "0", "--snapshot-interval-s", "0"], log_path=str(tmp_path / "b.log"), **common)
    try:
        await asyncio.to_thread(_wait_ready, a)  # a provisions the streams
        b.start()
        await asyncio.to_thread(_wait_ready, b)
        for wid in range(1, 5):
            await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=wid, pool="p", dp_size=2, ttl_s=3600))
        wl = Workload(seed=7)
        sizes: dict[int, int] = {}  # stream seq → events in that message
        worker_of: dict[int, int] = {}  # stream seq → worker of that message

        async def send(msg) -> None:
            seq = await publish(js, "p", msg)
            sizes[seq], worker_of[seq] = len(msg), msg[0].worker_id

        for _ in range(150):
            await send(wl.message())

        def snapshot_seq() -> int:
            return int(_status(a).get("pools", {}).get("p", {}).get("snapshot_seq", 0))

        await wait_for(lambda: snapshot_seq() >= max(sizes) - 30, timeout=40)
        for _ in range(20):  # keep publishing, then kill without warning
            await send(wl.message())
        a.kill()
        for _ in range(100):
            await send(wl.message())
        await delete_worker(nc, NAMES.workers_bucket, "p", 4)  # removal while a is down
        wl.forget_worker(4)
        for _ in range(30):
            await send(wl.message(key=(1, 0)))
        last = max(sizes)
        await wait_for(lambda: int(_status(b).get("applied_seq", 0)) >= last, timeout=40)
        reference = await _dump(nc)  # only b is up
        for _ in range(100):  # the discovery delete reaches b on its own stream: wait until applied
            if not any(e.worker_id == 4 for e in reference.events):
                break
            await asyncio.sleep(0.1)
            reference = await _dump(nc)
        assert reference.stream_seq == last
        assert not any(e.worker_id == 4 for e in reference.events)

        a.start()
        await asyncio.to_thread(_wait_ready, a)
        await wait_for(lambda: bool(_status(a).get("pools")))
        status = _status(a)
        restored = status["pools"]["p"]["restored_seq"]
        assert 0 < restored < last
        assert status["applied_seq"] == last
        b.terminate()
        restarted = await _dump(nc)  # only a is up
        assert restarted.stream_seq == last
        assert restarted.events == reference.events
        # Every event after the snapshot applied exactly once (or dropped as the removed worker's).
        pool = status["pools"]["p"]
        tail = [seq for seq in sizes if seq > restored]
        # worker 4's pre-deletion tail, dropped like b dropped its blocks
        assert pool["dropped_messages"] == sum(1 for seq in tail if worker_of[seq] == 4) > 0
        assert sum(pool["events"].values()) == sum(sizes[seq] for seq in tail if worker_of[seq] != 4)
        assert "snapshot.restored" in (tmp_path / "a.log").read_text()
        metrics = a.metrics()
        assert 'kvr_indexer_events_total{event_type="stored",outcome="ok",pool="p"}' in metrics
        assert "kvr_indexer_restore_seconds" in metrics
        # SIGTERM drains, exits 0 and leaves a snapshot covering everything applied
        assert a.terminate() == 0
        final = await snapshot.load(js, NAMES.snapshots_bucket, NAMES.snapshot_object("p"))
        assert final is not None and final.stream_seq == last
        assert final.index.dump() == reference.events
    finally:
        a.kill()
        b.kill()
