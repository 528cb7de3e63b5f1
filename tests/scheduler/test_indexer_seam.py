"""The overlap seam against the real indexer: over NATS (`kvr indexer` process) and in-process."""

from __future__ import annotations

import asyncio
import time

import pytest

from schemas import codec
from schemas.api import SelectReply, SelectRequest
from schemas.events import kv_msg_id, stored_event
from schemas.hashing import local_block_hashes
from services.runtime.natsio import StreamSettings, provision
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request
from services.runtime.workers import put_worker

from .conftest import NAMES, POOL, running_scheduler
from .helpers import record

TOKENS = list(range(1, 65))


async def seed_fleet(nc) -> None:
    """Workers 1 and 2; worker 2 has stored the first 3 blocks of TOKENS."""
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    for wid in (1, 2):
        await put_worker(nc, NAMES.workers_bucket, record(wid, pool=POOL, heartbeat_ms=int(time.time() * 1000), ttl_s=60))
    local = local_block_hashes(TOKENS, 16)[:3]
    ev = stored_event(2, 1, [(1000 + i, h) for i, h in enumerate(local)])
    await js.publish(NAMES.kv_subject(POOL, 2, 0), codec.encode_json(ev), headers={"Nats-Msg-Id": kv_msg_id(POOL, 2, 0, 1)})


async def select_until_overlap(nc, want: int) -> SelectReply:
    deadline = time.monotonic() + 10
    while True:
        r = await request(nc, NAMES.select(POOL), SelectRequest(request_id="x", token_ids=TOKENS, book=False), SelectReply, timeout=5)
        if r.overlap_blocks == want or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.05)


async def test_select_over_nats_with_the_real_indexer_process(nats_url, nc, tmp_path):
    await seed_fleet(nc)
    indexer = ServiceProcess("indexer", nats_url=nats_url, pools=[POOL], log_path=str(tmp_path / "indexer.log")).start()
    try:
        await asyncio.to_thread(indexer.wait_ready, 30)
        async with running_scheduler(nats_url, "--router-id", "s1"):
            r = await select_until_overlap(nc, 3)
            assert (r.decode.worker_id, r.overlap_blocks) == (2, 3)
            assert r.cost == pytest.approx((4 - 3) + 0.02 * 4)  # kvr rule: prefill left + 0.02 × decode blocks
    finally:
        indexer.terminate()


async def test_one_process_mode_embedded_indexer(nats_url, nc):
    await seed_fleet(nc)
    async with running_scheduler(nats_url, "--router-id", "s1", "--embedded-indexer") as app:
        assert type(app.overlap).__name__ == "EmbeddedOverlap"
        assert app.overlap.replica.watcher is app.watcher  # one discovery watcher for the process
        r = await select_until_overlap(nc, 3)
        assert (r.decode.worker_id, r.overlap_blocks) == (2, 3)
        # The in-process entry point gives the same decision without NATS.
        direct = await app.select(POOL, SelectRequest(request_id="y", token_ids=TOKENS, book=False))
        assert (direct.decode.worker_id, direct.overlap_blocks) == (2, 3)


def test_the_index_replica_restores_snapshots_but_writes_none_unless_asked():
    """`kvr scheduler` defaults: the indexer service writes the snapshots; a scheduler only restores them."""
    from services.indexer.replica import IndexReplica
    from services.indexer.settings import IndexerConfig
    from services.scheduler.settings import SchedulerConfig

    default = SchedulerConfig.from_argv([], env={})
    assert default.embedded_indexer and default.index.snapshot_restore
    assert not IndexReplica(default.index).snapshot_enabled
    assert IndexReplica(SchedulerConfig.from_argv(["--snapshot-interval-s", "30"], env={}).index).snapshot_enabled
    # The indexer service itself still writes them by default.
    indexer = IndexerConfig.from_argv([], env={})
    assert indexer.snapshot_interval_s > 0 and indexer.snapshot_every_events > 0
