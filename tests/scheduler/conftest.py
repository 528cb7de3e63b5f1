"""Scheduler test fixtures: an in-process scheduler on a real nats-server, and a scripted indexer.

The scripted indexer is a real NATS responder on `kvr.{pool}.indexer.match` (not a NATS mock): it
answers with the overlaps a test sets, so decisions can be checked exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from schemas import codec
from schemas.api import MatchReply, MatchRequest, StateReply, StateRequest, WorkerScore
from schemas.subjects import Names
from services.runtime.natsio import connect, provision
from services.runtime.responder import request, serve
from services.runtime.service import Runtime, stream_settings
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerConfig

POOL = "p"
NAMES = Names()


def scheduler_cfg(nats_url: str, *flags: str) -> SchedulerConfig:
    """The scheduler against an indexer over NATS (real or scripted) unless `flags` say otherwise."""
    argv = ["--nats-url", nats_url, "--pool", POOL, "--embedded-indexer", "false", *flags]
    return SchedulerConfig.from_argv(argv, env={})


@contextlib.asynccontextmanager
async def running_scheduler(nats_url: str, *flags: str) -> AsyncIterator[SchedulerApp]:
    cfg = scheduler_cfg(nats_url, *flags)
    nc = await connect(nats_url, "test-scheduler", max_wait_s=5)
    rt = Runtime("scheduler", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    app = SchedulerApp(cfg)
    await app.start(rt)
    try:
        for _ in range(200):
            if app.ready():
                break
            await asyncio.sleep(0.05)
        assert app.ready(), "scheduler did not become ready"
        yield app
    finally:
        await app.stop()
        # Drain like the real service does on SIGTERM: the server has processed our unsubscribes
        # before the connection goes, so no later request is routed to this replica's queue member.
        await nc.drain()


class ScriptedIndexer:
    def __init__(self) -> None:
        self.scores: dict[tuple[int, int], int] = {}
        self.tree_sizes: dict[tuple[int, int], int] = {}
        self.requests: list[MatchRequest] = []

    async def handle(self, req: MatchRequest, msg: Any) -> MatchReply:
        self.requests.append(req)
        n = len(req.block_hashes or [])
        return MatchReply(
            block_size=16,
            scores=[WorkerScore(worker_id=w, dp_rank=r, blocks=min(b, n)) for (w, r), b in sorted(self.scores.items())],
            tier_scores={},
            tree_sizes=[WorkerScore(worker_id=w, dp_rank=r, blocks=b) for (w, r), b in sorted(self.tree_sizes.items())],
            stream_seq=0,
        )


@pytest.fixture
async def indexer(nc) -> AsyncIterator[ScriptedIndexer]:
    fake = ScriptedIndexer()
    sub = await serve(nc, NAMES.match(POOL), MatchRequest, fake.handle, queue="indexer")
    yield fake
    await sub.unsubscribe()


async def states_of_all(nc, n: int, timeout: float = 2.0) -> list[StateReply]:
    """Ask every replica (no queue group) for its load view; collect n replies."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(NAMES.scheduler_state(POOL), codec.encode_json(StateRequest()), reply=inbox)
    out: list[StateReply] = []
    try:
        while len(out) < n:
            msg = await sub.next_msg(timeout=timeout)
            out.append(codec.decode_reply(msg.data, StateReply))
    finally:
        await sub.unsubscribe()
    return sorted(out, key=lambda s: s.router_id)


async def state_of(nc, router_id: str) -> StateReply:
    return await request(nc, f"{NAMES.scheduler_state(POOL)}.{router_id}", StateRequest(), StateReply)
