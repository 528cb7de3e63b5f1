"""Relay edge cases with vLLM's own event shapes: NATS stall under a burst, full report mode.

Two scenarios, each with a synthetic vLLM engine in a child process publishing on a real ZMQ PUB
socket to the real `RelayApp` (in this process), which publishes to a real nats-server:

  stall — the engine cycles 160 one-block prompts through a 128-block cache (every batch evicts
          one block and stores one): a burst of --burst batches is sent while nats-server is
          stalled for --stall-s seconds (SIGSTOP, or stopped with --stall stop). Printed: `cleared`
          events on the stream after the stall, blocks in the index (the real PrefixIndex fed with
          the stream) against the engine's cache and against a fresh conversion of the batches the
          relay kept (the surviving batches), stale and missing blocks, time to drain.
  full  — vLLM's block pool (two KV-cache groups of different sizes, LRU eviction, one
          BlockRemoved per hash and group) under --requests requests over shared prefixes, most in
          full report mode: stale and missing blocks of the index against the engine's cache.

    .venv/bin/python bench/relay_faults.py [--burst 12000] [--stall-s 4] [--stall pause|stop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib.fake_engine import BlockPoolSim, EventBatch, FakeEngine
from bench.lib.refindex import RefIndex
from services.indexer.index import PrefixIndex
from services.relay.convert import Converter
from services.relay.decode import decode_batch

BLOCK = 16


def encode(events: list[Any]) -> bytes:
    return msgspec.msgpack.encode(EventBatch(time.time(), events, 0))


def stall_workload(burst: int) -> tuple[list[bytes], list[bytes], set[int]]:
    eng = FakeEngine(0, encoding="map")
    pool = BlockPoolSim(eng, 128)
    prompts = [list(range(i * BLOCK, (i + 1) * BLOCK)) for i in range(160)]
    warm = [encode(pool.request(p, full_report=True)) for p in prompts[:128]]
    # 160 prompts through a 128-block cache: every batch evicts one block and stores one.
    hot = [encode(pool.request(prompts[(128 + i) % 160], full_report=True)) for i in range(burst)]
    return warm, hot, pool.cached()


def full_report_workload(requests: int, seed: int = 11) -> tuple[list[bytes], set[int]]:
    rng = random.Random(seed)
    eng = FakeEngine(0, encoding="map")
    pool = BlockPoolSim(eng, {0: 2048, 1: 512}, groups=(0, 1))
    prefixes = [[rng.randrange(1, 100_000) for _ in range(BLOCK * rng.randrange(1, 9))] for _ in range(300)]
    out = []
    for _ in range(requests):
        tokens = rng.choice(prefixes) + [rng.randrange(1, 100_000) for _ in range(BLOCK * rng.randrange(0, 6))]
        out.append(encode(pool.request(tokens, full_report=rng.random() < 0.8)))
    return out, pool.cached()


def engine_process(port: int, phases: list[list[bytes]], ready: Any, go: list[Any], done: list[Any]) -> None:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    pub.recv()  # a subscriber arrived
    ready.set()
    seq = 0
    for payloads, start, finished in zip(phases, go, done, strict=True):
        start.wait()
        for payload in payloads:
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            seq += 1
        finished.set()
    time.sleep(1.0)
    pub.close(linger=1000)
    ctx.term()


async def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


async def read_stream(js: Any, stream: str) -> list[Any]:
    from schemas import codec
    from schemas.events import RouterEvent

    info = await js.stream_info(stream)
    out: list[Any] = []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.extend(codec.decode(msg.data, list[RouterEvent], codec.content_type_of(dict(msg.headers or {}))))
    return out


def index_blocks(events: list[Any]) -> tuple[set[int], dict[Any, Any]]:
    index = PrefixIndex()
    index.apply_all(events)
    state = RefIndex().apply_all(index.dump()).state()
    return {h for tree in state.values() for _, h, _ in tree}, state


async def run(scenario: str, phases: list[list[bytes]], truth: set[int], args: argparse.Namespace) -> dict[str, Any]:
    from services.relay import metrics
    from services.relay.app import RelayApp
    from services.relay.settings import RelayConfig
    from services.runtime.embedded import NatsServer, free_port
    from services.runtime.logs import setup_logging
    from services.runtime.natsio import connect, provision
    from services.runtime.service import Runtime, stream_settings

    setup_logging("console", "error")
    server = NatsServer().start()
    port = free_port()
    ready = mp.Event()
    go, done = [mp.Event() for _ in phases], [mp.Event() for _ in phases]
    child = mp.get_context("fork").Process(target=engine_process, args=(port, phases, ready, go, done), daemon=True)
    try:
        argv = ["--nats-url", server.url, "--pool", "bench", "--zmq", f"tcp://127.0.0.1:{port}", "--pod-name", "bench-0",
                "--buffer-messages", str(args.buffer_messages), "--publish-timeout-s", "0.5", "--log-level", "error"]
        cfg = RelayConfig.from_argv(argv, env={})
        nc = await connect(cfg.nats_url, "bench-relay", max_wait_s=10)
        rt = Runtime("relay", cfg, nc)
        await provision(rt.js, rt.names, stream_settings(cfg))
        app = RelayApp(cfg)
        await app.start(rt)
        publisher = app.publisher
        assert publisher is not None
        dropped0 = metrics.DROPPED_MESSAGES._value.get()
        taken: list[Any] = []
        buf = publisher.buffer
        can_spy = hasattr(buf, "convert")  # converts when publishing (this version): record what it took
        if can_spy:
            convert = buf.convert

            def spy(item: Any) -> Any:
                taken.append(item)
                return convert(item)

            buf.convert = spy
        child.start()
        await wait_until(ready.is_set, 10, "engine subscriber")
        intake = app.intakes[0]
        sent = 0
        result: dict[str, Any] = {"scenario": scenario}
        for i, payloads in enumerate(phases):
            stall = scenario == "stall" and i == 1
            if stall:
                t_stall = time.monotonic()
                if args.stall == "pause":
                    assert server.proc is not None
                    os.kill(server.proc.pid, signal.SIGSTOP)
                else:
                    server.stop()
            go[i].set()
            sent += len(payloads)
            t0 = time.monotonic()
            await wait_until(lambda n=sent: intake.live_batches >= n, 120, "intake to take every batch")
            result.setdefault("intake_s", []).append(round(time.monotonic() - t0, 3))
            if stall:
                await asyncio.sleep(max(0.0, args.stall_s - (time.monotonic() - t_stall)))
                result["stall_s"] = round(time.monotonic() - t_stall, 2)
                if args.stall == "pause":
                    os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                else:
                    server.start()
                t_back = time.monotonic()
            await wait_until(lambda: publisher.pending() == 0, 300, "publisher to drain")
            if stall:
                result["drain_s"] = round(time.monotonic() - t_back, 2)
            if i == 0 and scenario == "stall":
                await wait_until(lambda: publisher.pending() == 0, 60, "warm-up published")
                warm_events = len(await read_stream(rt.js, cfg.kv_stream))
        events = await read_stream(rt.js, cfg.kv_stream)
        blocks, _ = index_blocks(events)
        result.update({
            "engine_batches": sent, "stream_events": len(events), "engine_cached_blocks": len(truth),
            "index_blocks": len(blocks), "stale_blocks": len(blocks - truth), "missing_blocks": len(truth - blocks),
            "dropped_batches": int(metrics.DROPPED_MESSAGES._value.get() - dropped0),
        })
        if scenario == "stall":
            after = events[warm_events:]
            result["cleared_after_stall"] = sum(e.kind == "cleared" for e in after)
            result["cleared_per_rank_after_stall"] = {
                str(r): sum(e.kind == "cleared" and e.event.dp_rank == r for e in after) for r in {e.event.dp_rank for e in after}
            }
            if can_spy:
                at = max(i for i, item in enumerate(taken) if item.payload is None)
                kept = [item.payload for item in taken[at + 1 :]]
                fresh = Converter(app.worker_id, BLOCK)
                want = fresh.clear(0) + [e for p in kept for e in fresh.convert(0, decode_batch(p).events)]
                want_blocks, _ = index_blocks(want)
                result.update({
                    "surviving_batches": len(kept), "surviving_are_newest": kept == phases[1][-len(kept):],
                    "surviving_batches_blocks": len(want_blocks), "index_equals_surviving_batches": blocks == want_blocks,
                })
        await app.stop()
        await nc.close()
        return result
    finally:
        if child.is_alive():
            child.kill()
        if server.proc is not None and args.stall == "pause":
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.proc.pid, signal.SIGCONT)
        server.cleanup()


def _repo_relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=12_000, help="engine batches sent during the stall")
    ap.add_argument("--stall-s", type=float, default=4.0)
    ap.add_argument("--stall", choices=("pause", "stop"), default="pause", help="SIGSTOP the server, or stop and restart it")
    ap.add_argument("--buffer-messages", type=int, default=10_000, help="the relay's --buffer-messages")
    ap.add_argument("--requests", type=int, default=5_000, help="requests of the full report scenario")
    ap.add_argument("--only", choices=("stall", "full"), default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "relay_faults.json"))
    args = ap.parse_args()

    results = []
    if args.only in (None, "stall"):
        warm, hot, truth = stall_workload(args.burst)
        results.append(asyncio.run(run("stall", [warm, hot], truth, args)))
    if args.only in (None, "full"):
        payloads, truth = full_report_workload(args.requests)
        results.append(asyncio.run(run("full", [payloads], truth, args)))
    for r in results:
        print(f"== {r['scenario']}")
        for key, value in r.items():
            if key != "scenario":
                print(f"  {key:<32} {value}")
    params = vars(args) | {"out": _repo_relative(args.out)}
    out = {"params": params, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
