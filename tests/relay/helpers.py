"""Test helpers: an in-process relay against a real nats-server, KVR_KV reader, a reference index."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY

from schemas import codec
from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, salt_seed
from services.relay.app import RelayApp
from services.relay.settings import SETTINGS
from services.runtime.config import COMMON, resolve
from services.runtime.embedded import free_port
from services.runtime.natsio import connect, provision
from services.runtime.service import Runtime, build_parser, stream_settings


def relay_cfg(nats_url: str, zmq_port: int, replay_port: int | None, *extra: str):
    argv = ["--nats-url", nats_url, "--pool", "p", "--zmq", f"tcp://127.0.0.1:{zmq_port}",
            "--pod-name", "vllm-0", "--address", "10.0.0.7", "--replay-timeout-s", "1",
            "--heartbeat-ttl-s", "3", "--log-level", "warning"]  # fmt: skip
    if replay_port is not None:
        argv += ["--replay", f"tcp://127.0.0.1:{replay_port}"]
    settings = [*COMMON, *SETTINGS]
    return resolve(build_parser("kvr relay", "", settings).parse_args([*argv, *extra]), settings, env={})


@dataclass
class RunningRelay:
    app: RelayApp
    rt: Runtime

    async def stop(self) -> None:
        await self.app.stop()
        await self.rt.nc.close()


async def start_relay(cfg) -> RunningRelay:  # type: ignore[no-untyped-def]
    nc = await connect(cfg.nats_url, "test-relay", max_wait_s=10)
    rt = Runtime("relay", cfg, nc)
    await provision(rt.js, rt.names, stream_settings(cfg))
    app = RelayApp(cfg)
    await app.start(rt)
    return RunningRelay(app, rt)


def ports(n: int = 2) -> list[int]:
    return [free_port() for _ in range(n)]


async def read_kv(js, stream: str = "KVR_KV") -> list[tuple[dict[str, str], RouterEvent]]:
    """Every RouterEvent in the stream, in order, with the headers of its message."""
    info = await js.stream_info(stream)
    out = []
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


@dataclass
class RefIndex:
    """A minimal docs/protocol.md §2 applier (per worker, rank and tier) to compare index states."""

    blocks: dict[tuple[int, int, str], dict[int, tuple[int, int | None]]] = field(default_factory=dict)
    last_id: dict[tuple[int, int], int] = field(default_factory=dict)
    duplicates: int = 0
    skipped_stores: int = 0

    def apply(self, ev: RouterEvent) -> None:
        key = (ev.worker_id, ev.event.dp_rank)
        last = self.last_id.get(key)
        if last is not None and ev.event.event_id <= last:
            self.duplicates += 1
            return
        self.last_id[key] = ev.event.event_id
        data = ev.event.data
        if isinstance(data, str):
            for k in [k for k in self.blocks if k[:2] == key]:
                del self.blocks[k]
            return
        tree = self.blocks.setdefault((*key, ev.storage_tier), {})
        if data.stored is not None:
            parent = data.stored.parent_hash
            if parent is not None and parent not in tree:
                self.skipped_stores += 1
                return
            for b in data.stored.blocks:
                tree[b.block_hash] = (b.tokens_hash, parent)
                parent = b.block_hash
        else:
            for h in data.removed.block_hashes:
                tree.pop(h, None)

    def apply_all(self, events: list[RouterEvent]) -> RefIndex:
        for ev in events:
            self.apply(ev)
        return self

    def state(self) -> dict[tuple[int, int, str], set[tuple[int, int, int | None]]]:
        """Content without engine-independent noise: (tokens_hash, block, parent) per tree."""
        return {k: {(t, h, p) for h, (t, p) in tree.items()} for k, tree in self.blocks.items() if tree}

    def match(self, tokens: list[int], block_size: int = 16, lora: str | None = None, salt: str | None = None,
              tier: str = "device") -> dict[tuple[int, int], int]:  # fmt: skip
        """Leading request blocks held per (worker, rank), following the chain by tokens_hash."""
        want = local_block_hashes(tokens, block_size, salt_seed(lora, salt))
        out = {}
        for wid, rank in self.last_id:
            tree = self.blocks.get((wid, rank, tier), {})
            children: dict[tuple[int | None, int], int] = {(p, th): h for h, (th, p) in tree.items()}
            parent, n = None, 0
            for th in want:
                h = children.get((parent, th))
                if h is None:
                    break
                parent, n = h, n + 1
            out[(wid, rank)] = n
        return out
