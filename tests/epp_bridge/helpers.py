"""Shared helpers of the EPP bridge tests: in-process bridge runtime, discovery records, KV events."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bench.lib.inproc import record  # noqa: F401 - the tests import it from here
from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, salt_seed
from services.epp_bridge.app import EppBridgeApp
from services.epp_bridge.settings import EppBridgeConfig
from services.runtime.service import Runtime
from services.runtime.workers import put_worker


def bridge_cfg(nats_url: str, *argv: str) -> EppBridgeConfig:
    # what `kvr epp-bridge` parses (with the scheduler's, for one-process mode)
    return EppBridgeConfig.from_argv(["--nats-url", nats_url, *argv], env={})


async def start_bridge(nc, nats_url: str, *argv: str) -> EppBridgeApp:
    from services.runtime.natsio import provision
    from services.runtime.service import stream_settings

    cfg = bridge_cfg(nats_url, *argv)
    rt = Runtime("epp-bridge", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    app = EppBridgeApp(cfg)
    await app.start(rt)
    return app


async def register(nc, records: Sequence[WorkerRecord], bucket: str = "KVR_WORKERS") -> None:
    for rec in records:
        await put_worker(nc, bucket, rec)


def stored_events(worker_id: int, tokens: Sequence[int], block_size: int, dp_rank: int = 0, event_id: int = 1, seed_of=None) -> bytes:
    """One stored event covering every full block of `tokens` (engine block hashes are made up)."""
    seed = seed_of if seed_of is not None else salt_seed()
    hashes = local_block_hashes(tokens, block_size, seed)
    blocks = [{"block_hash": 1_000_000 * worker_id + i + 1, "tokens_hash": h} for i, h in enumerate(hashes)]
    event = {
        "worker_id": worker_id,
        "event": {"event_id": event_id, "dp_rank": dp_rank, "data": {"stored": {"parent_hash": None, "blocks": blocks}}},
    }
    codec.decode(codec.encode_json(event), RouterEvent)  # the fixture itself must be valid
    return codec.encode_json(event)


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
