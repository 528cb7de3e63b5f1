"""Helpers for the indexer tests: an in-process IndexerApp on a real nats-server, publishing helpers."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from schemas import codec
from schemas.events import RouterEvent, kv_msg_id
from services.indexer.app import IndexerApp
from services.indexer.settings import SETTINGS
from services.runtime.config import COMMON, resolve
from services.runtime.natsio import StreamSettings, provision
from services.runtime.service import Runtime
from schemas.subjects import Names

NAMES = Names()


def make_cfg(**overrides):
    cfg = resolve(argparse.Namespace(), [*COMMON, *SETTINGS], env={})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


async def publish(js, pool: str, events: list[RouterEvent] | RouterEvent, *, msgpack: bool = False) -> int:
    """Publish one message (one event or a batch of one worker/dp rank); returns its stream sequence."""
    first = events[0] if isinstance(events, list) else events
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
