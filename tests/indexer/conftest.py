"""Helpers for the indexer tests: an in-process IndexerApp on a real nats-server, publishing helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent, kv_msg_id
from schemas.subjects import Names
from services.indexer.app import IndexerApp
from services.indexer.settings import IndexerConfig
from services.runtime.natsio import StreamSettings, provision
from services.runtime.service import Runtime
from services.runtime.workers import put_worker

NAMES = Names()


def make_cfg(**overrides) -> IndexerConfig:
    return IndexerConfig.build(overrides)


_REGISTERED: dict[int, tuple[object, set[tuple[str, int]]]] = {}


async def register(js, pool: str, worker_id: int, **fields) -> None:
    """Put the worker's discovery record, as a real worker does before (or while) it publishes."""
    nc = js._nc
    record = WorkerRecord(worker_id=worker_id, pool=pool, ttl_s=3600, dp_size=fields.pop("dp_size", 1024), **fields)
    await put_worker(nc, NAMES.workers_bucket, record)
    _REGISTERED.setdefault(id(nc), (nc, set()))[1].add((pool, worker_id))


async def publish(js, pool: str, events: list[RouterEvent] | RouterEvent, *, msgpack: bool = False, register_worker: bool = True) -> int:
    """Publish one message (one event or a batch of one worker/dp rank); returns its stream sequence.
    The worker is registered in discovery first (once per connection) unless `register_worker=False`:
    the indexer holds messages of workers it does not know yet."""
    first = events[0] if isinstance(events, list) else events
    known = _REGISTERED.get(id(js._nc))
    if register_worker and (known is None or (pool, first.worker_id) not in known[1]):
        kv = await js.key_value(NAMES.workers_bucket)
        try:
            await kv.get(f"{pool}.{first.worker_id}")  # the test put its own record: keep it
            _REGISTERED.setdefault(id(js._nc), (js._nc, set()))[1].add((pool, first.worker_id))
        except Exception:  # noqa: BLE001 - no record (or a deleted one): register now
            await register(js, pool, first.worker_id)
    headers = {"Nats-Msg-Id": kv_msg_id(pool, first.worker_id, first.event.dp_rank, first.event.event_id)}
    if msgpack:
        headers[codec.CONTENT_TYPE_HEADER] = codec.MSGPACK
    data = codec.encode(events, codec.MSGPACK if msgpack else None)
    ack = await js.publish(NAMES.kv_subject(pool, first.worker_id, first.event.dp_rank), data, headers=headers)
    return ack.seq


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def start_indexer(nc) -> AsyncIterator:
    """Factory: `app = await start_indexer(**cfg_overrides)`; stopped at teardown."""
    await provision(nc.jetstream(), NAMES, StreamSettings())
    apps: list[IndexerApp] = []

    async def start(**overrides) -> IndexerApp:
        overrides.setdefault("pool", ["p"])
        cfg = make_cfg(**overrides)
        app = IndexerApp(cfg)
        await app.start(Runtime("indexer", cfg, nc))
        apps.append(app)
        await wait_for(app.ready)
        return app

    yield start
    for app in apps:
        await app.stop()
