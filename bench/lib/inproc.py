"""Services in the benchmark's own process, on a real nats-server: a `kvr` command's resolved config,
a started scheduler or bridge, discovery records."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NATS

from schemas.discovery import WorkerRecord
from services.epp_bridge.app import EppBridgeApp
from services.epp_bridge.settings import EppBridgeConfig
from services.indexer.settings import IndexerConfig
from services.runtime.config import Config
from services.runtime.natsio import connect, provision
from services.runtime.service import Runtime, stream_settings
from services.runtime.workers import now_ms, put_worker
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerConfig

C = TypeVar("C", bound=Config)


def command_cfg(cls: type[C], *argv: str, **overrides: Any) -> C:
    """What the command resolves `argv…` to (no environment), with `overrides` (settings by name)."""
    cfg = cls.from_argv(argv, env={})
    return cfg.with_values(**overrides) if overrides else cfg


def indexer_cfg(*argv: str, **overrides: Any) -> IndexerConfig:
    return command_cfg(IndexerConfig, *argv, **overrides)


@contextlib.asynccontextmanager
async def running_scheduler(nats_url: str, *argv: str, pool: str = "p") -> AsyncIterator[SchedulerApp]:
    """`kvr scheduler --pool pool argv…` in this process, ready; stopped and drained on exit."""
    cfg = command_cfg(SchedulerConfig, "--nats-url", nats_url, "--pool", pool, *argv)
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
    cfg = command_cfg(EppBridgeConfig, "--nats-url", nats_url, *argv)
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
