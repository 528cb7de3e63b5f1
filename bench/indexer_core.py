"""In-process benchmark of the pure prefix index: apply throughput, match throughput, memory per entry,
snapshot encode/decode of the same index.

    .venv/bin/python bench/indexer_core.py [--workers 64] [--prompts-per-worker 256] [--blocks 64]

Workload: a pool of prompts of `--blocks` blocks, each = one of 64 shared "system" prefixes (8-32
blocks) + a unique suffix. Every worker stores `--prompts-per-worker` prompts drawn from the pool
as one stored event each (engine hash = sequence hash of the path, as vLLM does), so prefixes are
shared both within and across workers. Prints a table and writes bench/results/indexer_core.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.events import stored_event
from schemas.hashing import sequence_hashes
from services.indexer.index import PrefixIndex
from services.indexer.treecodec import decode_snapshot, encode_snapshot
from services.runtime.heap import tune_gc

RESULTS = Path(__file__).parent / "results"


def make_prompts(rng: random.Random, n: int, blocks: int) -> list[list[int]]:
    prefixes = [[rng.getrandbits(64) for _ in range(rng.randint(8, 32))] for _ in range(64)]
    prompts = []
    for _ in range(n):
        head = rng.choice(prefixes)
        prompts.append(head + [rng.getrandbits(64) for _ in range(blocks - len(head))])
    return prompts


def build_events(rng: random.Random, prompts: list[list[int]], workers: int, per_worker: int):
    seqs = [sequence_hashes(p) for p in prompts]
    events = []
    for w in range(workers):
        for i in range(per_worker):
            j = rng.randrange(len(prompts))
            events.append(stored_event(w, i, list(zip(seqs[j], prompts[j], strict=False))))
    rng.shuffle(events)  # interleave workers; each worker's ids must still increase
    next_id = [0] * workers
    for ev in events:
        ev.event.event_id = next_id[ev.worker_id]
        next_id[ev.worker_id] += 1
    return events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--prompts-per-worker", type=int, default=256)
    ap.add_argument("--pool-prompts", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--matches", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "indexer_core.json"))
    ap.add_argument("--default-gc", action="store_true", help="keep CPython's default GC thresholds (as when embedded)")
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()  # what `kvr indexer` does at start
    rng = random.Random(args.seed)
    prompts = make_prompts(rng, args.pool_prompts, args.blocks)
    events = build_events(rng, prompts, args.workers, args.prompts_per_worker)
    blocks_applied = sum(len(e.event.data.stored.blocks) for e in events)

    # apply throughput (fresh index, GC as in production)
    index = PrefixIndex()
    c0, t0 = time.process_time(), time.perf_counter()
    for ev in events:
        index.apply(ev)
    apply_s = time.perf_counter() - t0
    apply_cpu = time.process_time() - c0
    entries = index.blocks

    # memory per (block, worker) entry: build again under tracemalloc; events are allocated before
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    mem_index = PrefixIndex()
    for ev in events:
        mem_index.apply(ev)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del mem_index

    # match throughput: 64-block queries; half are pool prompts (hits), half diverge at a random depth
    queries = []
    for _ in range(5000):
        p = rng.choice(prompts)
        if rng.random() < 0.5:
            cut = rng.randrange(1, len(p))
            p = p[:cut] + [rng.getrandbits(64) for _ in range(len(p) - cut)]
        queries.append(p)
    n = args.matches
    c0, t0 = time.process_time(), time.perf_counter()
    total_hits = 0
    for i in range(n):
        total_hits += len(index.find_matches(queries[i % len(queries)]).scores)
    match_s = time.perf_counter() - t0
    match_cpu = time.process_time() - c0

    # snapshot encode / decode of the same index
    t0 = time.perf_counter()
    blob = encode_snapshot(index, 1)
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored, _, _ = decode_snapshot(blob)
    dec_s = time.perf_counter() - t0
    assert restored.blocks == entries

    # the same queries once on the restored index, which has no runs yet: each match walks block by
    # block and leaves runs behind for the next (the worst case of the read cache)
    t0 = time.perf_counter()
    for q in queries:
        restored.find_matches(q)
    cold_s = time.perf_counter() - t0
    runs, run_bytes = index.run_stats()

    t0 = time.perf_counter()
    dump = index.dump()
    dump_s = time.perf_counter() - t0

    results = {
        "workers": args.workers,
        "events": len(events),
        "blocks_applied": blocks_applied,
        "entries": entries,
        "nodes": index.nodes,
        "apply_blocks_per_s": blocks_applied / apply_s,
        "apply_events_per_s": len(events) / apply_s,
        "apply_blocks_per_cpu_s": blocks_applied / apply_cpu,
        "match_per_s": n / match_s,
        "match_per_cpu_s": n / match_cpu,
        "match_mean_us": match_s / n * 1e6,
        "avg_workers_scored": total_hits / n,
        "match_cold_per_s": len(queries) / cold_s,
        "runs": runs,
        "run_bytes_per_entry": run_bytes / entries,
        "bytes_per_entry": used / entries,
        "index_bytes": used,
        "snapshot_bytes": len(blob),
        "snapshot_encode_s": enc_s,
        "snapshot_decode_s": dec_s,
        "dump_events": len(dump),
        "dump_s": dump_s,
        "python": sys.version.split()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("(block, worker) entries", f"{entries:,}"),
        ("tree nodes", f"{index.nodes:,}"),
        ("apply", f"{results['apply_blocks_per_s']:,.0f} blocks/s wall, {results['apply_blocks_per_cpu_s']:,.0f} per CPU-s"),
        ("match (64-block prompts)", f"{results['match_per_s']:,.0f} matches/s wall, {results['match_per_cpu_s']:,.0f} per CPU-s"),
        ("match, first pass (no runs)", f"{results['match_cold_per_s']:,.0f} matches/s wall"),
        ("memory per entry", f"{results['bytes_per_entry']:.0f} bytes ({used / 2**20:,.0f} MiB total)"),
        ("runs after matching", f"{runs:,} runs, {results['run_bytes_per_entry']:.1f} bytes per entry more"),
        ("snapshot", f"{len(blob) / 2**20:.1f} MiB, encode {enc_s:.2f} s, decode+rebuild {dec_s:.2f} s"),
        ("dump", f"{len(dump):,} events in {dump_s:.2f} s"),
    ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
