"""Services in the benchmark's own process, on a real nats-server: a `kvr` command's resolved config,
a started scheduler or bridge, discovery records."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

from nats.aio.client import Client as NATS

from schemas.discovery import WorkerRecord
from services.epp_bridge.app import EppBridgeApp
from services.epp_bridge.settings import COMMAND_SETTINGS as BRIDGE_SETTINGS
from services.indexer.settings import COMMAND_SETTINGS as INDEXER_SETTINGS
from services.runtime.config import COMMON, Setting, resolve
from services.runtime.natsio import connect, provision
from services.runtime.service import Runtime, build_parser, stream_settings
from services.runtime.workers import now_ms, put_worker
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import COMMAND_SETTINGS as SCHEDULER_SETTINGS


def command_cfg(command: str, settings: Sequence[Setting], *argv: str, **overrides: Any) -> SimpleNamespace:
    """What `kvr <command> argv…` resolves to (no environment), then `overrides` set on it."""
    every = [*COMMON, *settings]
    cfg = resolve(build_parser(f"kvr {command}", "", every).parse_args(list(argv)), every, env={})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def indexer_cfg(*argv: str, **overrides: Any) -> SimpleNamespace:
    return command_cfg("indexer", INDEXER_SETTINGS, *argv, **overrides)


@contextlib.asynccontextmanager
async def running_scheduler(nats_url: str, *argv: str, pool: str = "p") -> AsyncIterator[SchedulerApp]:
    """`kvr scheduler --pool pool argv…` in this process, ready; stopped and drained on exit."""
    cfg = command_cfg("scheduler", SCHEDULER_SETTINGS, "--nats-url", nats_url, "--pool", pool, *argv)
    nc = await connect(nats_url, "bench-scheduler", max_wait_s=5)
    rt = Runtime("scheduler", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    app = SchedulerApp(cfg)
    await app.start(rt)
    try:
        for _ in range(400):
            if app.ready():
                break
            await asyncio.sleep(0.05)
        if not app.ready():
            raise RuntimeError("the scheduler did not become ready")
        yield app
    finally:
        await app.stop()
        await nc.drain()


async def start_bridge(nc: NATS, nats_url: str, *argv: str) -> EppBridgeApp:
    """`kvr epp-bridge argv…` in this process, on the connection `nc` (stop it with `.stop()`)."""
    cfg = command_cfg("epp-bridge", BRIDGE_SETTINGS, "--nats-url", nats_url, *argv)
    rt = Runtime("epp-bridge", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    app = EppBridgeApp(cfg)
    await app.start(rt)
    return app


def record(worker_id: int, pool: str = "p", **kw: Any) -> WorkerRecord:
    """A discovery record of a (fake) vLLM worker at 10.0.0.{id}:8000, alive for 5 minutes."""
    kw.setdefault("pod_name", f"vllm-{worker_id}")
    kw.setdefault("address", f"10.0.0.{worker_id}")
    kw.setdefault("port", 8000)
    kw.setdefault("ttl_s", 300.0)
    kw.setdefault("block_size", 4)
    return WorkerRecord(worker_id=worker_id, pool=pool, heartbeat_ms=now_ms(), **kw)


async def register(nc: NATS, records: Sequence[WorkerRecord], bucket: str = "KVR_WORKERS") -> None:
    for rec in records:
        await put_worker(nc, bucket, rec)
