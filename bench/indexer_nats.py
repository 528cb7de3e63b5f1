"""Indexer over a real nats-server: JetStream ingest rate, restart from a 1M-entry snapshot, and
`indexer.match` latency at a fixed request rate against a `kvr indexer` process.

    .venv/bin/python bench/indexer_nats.py [--ingest-messages 6000] [--rate 2000] [--seconds 10]

Prints a table and writes bench/results/indexer_nats.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats

from bench.indexer_core import build_events, make_prompts
from bench.lib.inproc import indexer_cfg
from schemas import codec
from schemas.api import MatchRequest
from schemas.discovery import WorkerRecord
from schemas.events import kv_msg_id, stored_event
from schemas.hashing import sequence_hashes
from schemas.subjects import Names
from services.indexer import snapshot
from services.indexer.app import IndexerApp
from services.indexer.index import PrefixIndex
from services.runtime.embedded import NatsServer
from services.runtime.heap import tune_gc
from services.runtime.natsio import StreamSettings, provision
from services.runtime.procs import ServiceProcess
from services.runtime.service import Runtime
from services.runtime.workers import put_worker

RESULTS = Path(__file__).parent / "results"
NAMES = Names()
POOL = "bench"


async def publish_ingest(js, rng: random.Random, messages: int, workers: int, blocks: int) -> tuple[int, int, list[list[int]]]:
    """Each message = one stored event of `blocks` new blocks continuing that worker's last chain."""
    prompts = make_prompts(rng, 2048, blocks)
    next_id = [0] * workers
    total_blocks = 0
    last = 0
    pending = []
    for i in range(messages):
        w = i % workers
        p = prompts[rng.randrange(len(prompts))]
        ev = stored_event(w, next_id[w], list(zip(sequence_hashes(p), p, strict=True)))
        next_id[w] += 1
        total_blocks += len(p)
        headers = {"Nats-Msg-Id": kv_msg_id(POOL, w, 0, ev.event.event_id), "Content-Type": codec.MSGPACK}
        pending.append(js.publish(NAMES.kv_subject(POOL, w, 0), codec.encode_msgpack(ev), headers=headers))
        if len(pending) >= 256:
            acks = await asyncio.gather(*pending)
            last = max(last, max(a.seq for a in acks))
            pending = []
    if pending:
        acks = await asyncio.gather(*pending)
        last = max(last, max(a.seq for a in acks))
    return last, total_blocks, prompts


async def ingest(nc, last_seq: int) -> float:
    cfg = indexer_cfg(pool=[POOL], snapshot_every_events=0, snapshot_interval_s=0, serve_endpoints=False, snapshot_restore=False)
    app = IndexerApp(cfg)
    first: list[float] = []
    on_kv = app.replica._on_kv

    def timed(seq, subject, data, headers):  # first-message timestamp, then the real apply
        if not first:
            first.append(time.perf_counter())
        on_kv(seq, subject, data, headers)

    app.replica._on_kv = timed  # type: ignore[method-assign]
    await app.start(Runtime("indexer", cfg, nc))
    while app.applied_seq < last_seq:
        await asyncio.sleep(0.001)
    took = time.perf_counter() - first[0]  # from the first message applied: excludes start-up waits
    await app.stop()
    return took


async def restart_from_snapshot(nc, js, entries_target: int) -> dict:
    rng = random.Random(3)
    workers = 64
    per_worker = max(1, round(entries_target / 2931))  # measured: 342 prompts per worker → 1,002,453 entries
    prompts = make_prompts(rng, 8192, 64)
    index = PrefixIndex()
    for ev in build_events(rng, prompts, workers, per_worker):
        index.apply(ev)
    t0 = time.perf_counter()
    data = snapshot.serialise(index, 0)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    await snapshot.upload(js, NAMES.snapshots_bucket, NAMES.snapshot_object("big"), data)
    upload_s = time.perf_counter() - t0
    entries = index.blocks
    del index
    cfg = indexer_cfg(pool=["big"], snapshot_every_events=0, snapshot_interval_s=0, serve_endpoints=False)
    app = IndexerApp(cfg)
    t0 = time.perf_counter()
    await app.start(Runtime("indexer", cfg, nc))
    while not app.ready():
        await asyncio.sleep(0.005)
    ready_s = time.perf_counter() - t0
    assert app.index("big").blocks == entries
    await app.stop()
    return {"entries": entries, "snapshot_bytes": len(data), "encode_s": encode_s, "upload_s": upload_s, "restart_ready_s": ready_s}


async def match_latency(nc, prompts: list[list[int]], rate: float, seconds: float) -> dict:
    rng = random.Random(5)
    queries = []
    for _ in range(2000):
        p = list(rng.choice(prompts))
        if rng.random() < 0.5:
            cut = rng.randrange(1, len(p))
            p = p[:cut] + [rng.getrandbits(64) for _ in range(len(p) - cut)]
        queries.append(codec.encode(MatchRequest(block_hashes=p)))
    subject = NAMES.match(POOL)
    for query in queries[:200]:  # warm-up
        await nc.request(subject, query, timeout=2)
    latencies: list[float] = []
    errors = 0
    n = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    # Light client: one wildcard reply subscription, no per-request future; latency from the send time.
    sent = [0.0] * n
    done = asyncio.Event()
    received = 0

    async def on_reply(msg) -> None:
        nonlocal received, errors
        i = int(msg.subject.rsplit(".", 1)[1])
        latencies.append(time.perf_counter() - sent[i])
        if b'"status":"error"' in msg.data:
            errors += 1
        received += 1
        if received == n:
            done.set()

    inbox = "_BENCH." + nc.new_inbox().rsplit(".", 1)[1]
    sub = await nc.subscribe(inbox + ".*", cb=on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
    t0 = time.perf_counter()
    for i in range(n):  # open loop: each request goes out at its scheduled time, whatever the replies do
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter()
        await nc.publish(subject, queries[i % len(queries)], reply=f"{inbox}.{i}")
    try:
        await asyncio.wait_for(done.wait(), 30)
    except TimeoutError:
        errors += n - received
    wall = time.perf_counter() - t0
    await sub.unsubscribe()
    latencies.sort()
    q = statistics.quantiles(latencies, n=1000)
    return {
        "offered_rate": rate,
        "achieved_rate": len(latencies) / wall,
        "requests": n,
        "errors": errors,
        "p50_ms": q[499] * 1e3,
        "p90_ms": q[899] * 1e3,
        "p99_ms": q[989] * 1e3,
        "max_ms": latencies[-1] * 1e3,
    }


def server_quantiles(metrics_text: str, endpoint: str) -> dict:
    """Quantiles (bucket upper bounds) of the service's own request-time histogram."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith("kvr_request_seconds_bucket{") and f'endpoint="{endpoint}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out: dict[str, float | None] = {"count": total}
    for name, q in (("p50_le_ms", 0.5), ("p99_le_ms", 0.99)):
        out[name] = next((b * 1e3 for b, c in buckets if c >= q * total), None)
    return out


async def amain(args: argparse.Namespace) -> dict:
    server = NatsServer().start()
    proc = None
    try:
        nc = await nats.connect(server.url, pending_size=256 * 1024 * 1024)
        js = nc.jetstream()
        await provision(js, NAMES, StreamSettings())
        for w in range(64):  # the indexer holds messages of workers that are not in discovery
            await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=w, pool=POOL, ttl_s=3600))
        rng = random.Random(1)
        last_seq, total_blocks, prompts = await publish_ingest(js, rng, args.ingest_messages, 64, 64)
        ingest_s = await ingest(nc, last_seq)
        restart = await restart_from_snapshot(nc, js, args.restart_entries)
        proc = ServiceProcess(
            "indexer", args=["--snapshot-every-events", "0", "--snapshot-interval-s", "0"], nats_url=server.url, pools=[POOL]
        ).start()
        await asyncio.to_thread(proc.wait_ready, 120)
        latency = await match_latency(nc, prompts, args.rate, args.seconds)
        # The service's own view is a bonus figure: a /metrics that does not answer in time loses it, not the run.
        scrape = proc.scrape("/metrics")
        latency["server_side"] = server_quantiles(scrape.body, "indexer.match") if scrape.ok else {"metrics_scrape_error": scrape.error}
        await nc.close()
        return {
            "ingest_messages": args.ingest_messages,
            "ingest_blocks": total_blocks,
            "ingest_s": ingest_s,
            "ingest_blocks_per_s": total_blocks / ingest_s,
            "restart": restart,
            "match_over_nats": latency,
        }
    finally:
        if proc is not None:
            proc.terminate()
        server.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ingest-messages", type=int, default=6000)
    ap.add_argument("--restart-entries", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", default=str(RESULTS / "indexer_nats.json"))
    args = ap.parse_args()
    tune_gc()  # the in-process ingest and restart stand for a `kvr indexer` process, which does this
    res = asyncio.run(amain(args))
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    r, lat = res["restart"], res["match_over_nats"]
    side = lat["server_side"]
    in_service = (f"in the service: missing ({side['metrics_scrape_error']})" if "metrics_scrape_error" in side
                  else f"in the service p50 ≤ {side['p50_le_ms']} ms, p99 ≤ {side['p99_le_ms']} ms")
    rows = [
        ("JetStream ingest", f"{res['ingest_blocks']:,} blocks in {res['ingest_s']:.2f} s = {res['ingest_blocks_per_s']:,.0f} blocks/s"),
        ("restart from snapshot", f"{r['entries']:,} entries, {r['snapshot_bytes'] / 2**20:.1f} MiB, ready in {r['restart_ready_s']:.2f} s"),
        (
            "match over NATS",
            f"offered {lat['offered_rate']:.0f}/s achieved {lat['achieved_rate']:.0f}/s  p50 {lat['p50_ms']:.2f} ms  "
            f"p90 {lat['p90_ms']:.2f} ms  p99 {lat['p99_ms']:.2f} ms  errors {lat['errors']}; "
            + in_service,
        ),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
