"""Test helpers: an in-process relay against a real nats-server, KVR_KV reader (the reference index
is `bench/lib/refindex.py`, shared with bench/relay_faults.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY

from schemas import codec
from schemas.events import RouterEvent
from services.relay.app import RelayApp
from services.relay.settings import RelayConfig
from services.runtime.embedded import free_port
from services.runtime.natsio import connect, provision
from services.runtime.service import Runtime, stream_settings


def relay_cfg(nats_url: str, zmq_port: int, replay_port: int | None, *extra: str):
    argv = ["--nats-url", nats_url, "--pool", "p", "--zmq", f"tcp://127.0.0.1:{zmq_port}",
            "--pod-name", "vllm-0", "--address", "10.0.0.7", "--replay-timeout-s", "1",
            "--heartbeat-ttl-s", "3", "--log-level", "warning"]
    if replay_port is not None:
        argv += ["--replay", f"tcp://127.0.0.1:{replay_port}"]
    return RelayConfig.from_argv([*argv, *extra], env={})


@dataclass
class RunningRelay:
    app: RelayApp
    rt: Runtime

    async def stop(self) -> None:
        try:
            await self.app.stop()
        finally:
            await self.rt.nc.close()


async def start_relay(cfg) -> RunningRelay:
    nc = await connect(cfg.nats_url, "test-relay", max_wait_s=10)
    rt = Runtime("relay", cfg, nc)
    app = RelayApp(cfg)
    try:
        await provision(rt.js, rt.names, stream_settings(cfg))
        await app.start(rt)
    except BaseException:
        await RunningRelay(app, rt).stop()  # as `kvr relay` does after a failed start
        raise
    return RunningRelay(app, rt)


def ports(n: int = 2) -> list[int]:
    return [free_port() for _ in range(n)]


async def read_kv(js, stream: str = "KVR_KV") -> list[tuple[dict[str, str], RouterEvent]]:
    """Every RouterEvent in the stream, in order, with the headers of its message."""
    info = await js.stream_info(stream)
    out: list[tuple[dict[str, str], RouterEvent]] = []
    if not info.state.messages:
        return []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        headers = dict(msg.headers or {})
        events = codec.decode(msg.data, list[RouterEvent], codec.content_type_of(headers))
        out.extend((headers, ev) for ev in events)
    return out


async def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_kv(js, n_events: int, timeout: float = 10.0) -> list[RouterEvent]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        events = [ev for _, ev in await read_kv(js)]
        if len(events) >= n_events or asyncio.get_running_loop().time() > deadline:
            return events
        await asyncio.sleep(0.05)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0

