"""Shared harness of the scheduler benchmarks: a real nats-server, a seeded fleet, service processes,
and a closed-loop select load generator that records per-request latency."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec
import nats

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import kv_msg_id, stored_event
from schemas.hashing import local_block_hashes
from schemas.subjects import Names
from services.runtime.natsio import StreamSettings, provision
from services.runtime.workers import put_worker

POOL = "bench"
NAMES = Names()
RESULTS = ROOT / "bench" / "results"
MSGPACK = {"Content-Type": "application/msgpack"}


@dataclass
class Workload:
    groups: int = 64  # distinct shared prefixes
    prefix_blocks: int = 24
    suffix_blocks: int = 8
    block_size: int = 16
    seed: int = 1

    def prefix(self, g: int) -> list[int]:
        return [(g * 7919 + i) % 50_000 for i in range(self.prefix_blocks * self.block_size)]

    def prompt(self, rng: random.Random) -> list[int]:
        g = rng.randrange(self.groups)
        return self.prefix(g) + [rng.randrange(50_000) for _ in range(self.suffix_blocks * self.block_size)]


async def seed_fleet(nc, n_workers: int, wl: Workload) -> None:
    """Workers 1..n; each prefix group is cached (its prefix blocks) on one worker."""
    js = nc.jetstream()
    await provision(js, NAMES, StreamSettings())
    now = int(time.time() * 1000)
    for wid in range(1, n_workers + 1):
        rec = WorkerRecord(worker_id=wid, pool=POOL, address=f"10.0.0.{wid}", port=8000, pod_name=f"w{wid}",
                           block_size=wl.block_size, heartbeat_ms=now, ttl_s=3600)
        await put_worker(nc, NAMES.workers_bucket, rec)
    event_ids: dict[int, int] = {}
    for g in range(wl.groups):
        wid = 1 + g % n_workers
        local = local_block_hashes(wl.prefix(g), wl.block_size)
        eid = event_ids.get(wid, 0) + 1
        event_ids[wid] = eid
        blocks = [(g * 1_000_000 + i, h) for i, h in enumerate(local)]
        ev = stored_event(wid, eid, blocks)
        await js.publish(NAMES.kv_subject(POOL, wid, 0), codec.encode_json(ev), headers={"Nats-Msg-Id": kv_msg_id(POOL, wid, 0, eid)})


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    overlap_blocks: int = 0
    request_blocks: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)

        def q(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else float("nan")

        return {
            "selections": len(lat),
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 2),
            "selections_per_s": round(len(lat) / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": q(0.50),
            "p90_ms": q(0.90),
            "p99_ms": q(0.99),
            "max_ms": round(lat[-1], 3) if lat else float("nan"),
            "mean_ms": round(statistics.fmean(lat), 3) if lat else float("nan"),
            "kv_hit_ratio": round(self.overlap_blocks / self.request_blocks, 3) if self.request_blocks else 0.0,
        }


async def run_load(
    nc, wl: Workload, duration_s: float, concurrency: int, book: bool, warmup_s: float = 1.0, rate: float | None = None
) -> LoadResult:
    """Closed loop (or paced at `rate`/s): select (msgpack), then free the booking when booked."""
    res = LoadResult()
    select_subject, booking_subject = NAMES.select(POOL), NAMES.booking(POOL)
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()
    counter = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    interval = concurrency / rate if rate else 0.0

    # Prompts are drawn before the clock starts so the generator spends its CPU on requests.
    prompts = [[wl.prompt(random.Random(wl.seed * 1000 + cid * 997 + k)) for k in range(256)] for cid in range(concurrency)]

    async def client(cid: int) -> None:
        nonlocal counter
        mine = prompts[cid]
        next_at = loop.time() + cid * interval / concurrency  # staggered: no synchronized bursts
        while loop.time() < stop_at:
            if interval:
                next_at += interval
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            counter += 1
            rid = f"c{cid}-{counter}"
            tokens = mine[counter % len(mine)]
            payload = enc.encode({"request_id": rid, "token_ids": tokens, "book": book})
            t0 = time.perf_counter()
            msg = await nc.request(select_subject, payload, timeout=5, headers=MSGPACK)
            dt = (time.perf_counter() - t0) * 1000
            reply = dec.decode(msg.data)
            measuring = loop.time() >= measure_from
            if reply.get("status") != "ok":
                res.errors += measuring
                continue
            if measuring:
                res.latencies_ms.append(dt)
                res.overlap_blocks += reply["overlap_blocks"]
                res.request_blocks += len(tokens) // wl.block_size
            if book:
                await nc.request(booking_subject, enc.encode({"request_id": rid, "phase": "free"}), timeout=5, headers=MSGPACK)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    res.elapsed_s = duration_s
    return res


async def connect(url: str):
    return await nats.connect(url, pending_size=64 * 1024 * 1024)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    out = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    out += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)
