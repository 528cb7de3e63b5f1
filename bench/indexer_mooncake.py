"""Mooncake trace replay through the pure prefix index (in-process).

    .venv/bin/python bench/indexer_mooncake.py [--trace conversation|synthetic|both] [--workers 16] [--capacity 1024]

Each trace request = one `find_matches` on its `hash_ids` (one id per 512-token block, ids encode the
whole prefix, so they serve as local hashes) + one stored event for the blocks the chosen worker does
not hold yet. The worker is chosen with Dynamo's default cost shape: blocks to prefill (request blocks
minus overlap) plus the worker's load, here the blocks of its requests among the last 256 routed
(ties: lowest id). Every worker keeps an LRU of `--capacity` blocks
(default 1,024 x 512 tokens, about 0.5 M tokens: an 8B model on one 80 GB GPU); blocks touched by a request are refreshed leaf
first, so parents outlive children, and overflow produces a removed event. ops = matches + stored +
removed events; latency is the time of each index call. Writes bench/results/indexer_mooncake.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.events import removed_event, stored_event
from services.indexer.index import PrefixIndex
from services.replay.trace import open_trace
from services.runtime.heap import tune_gc

DATA = Path(__file__).resolve().parents[1] / "data"
RESULTS = Path(__file__).parent / "results"
TRACES = {"conversation": "mooncake_conversation_trace.jsonl.gz", "synthetic": "mooncake_synthetic_trace.jsonl.gz"}
ENGINE_OFFSET = 1 << 40  # engine hashes differ from local hashes, as in a real engine


def replay(path: Path, workers: int, capacity: int) -> dict:
    with open_trace(path) as fh:
        requests = [json.loads(line)["hash_ids"] for line in fh]
    index = PrefixIndex()
    lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
    next_id = [0] * workers
    match_lat: list[float] = []
    store_lat: list[float] = []
    remove_lat: list[float] = []
    hit_blocks = total_blocks = 0
    window: deque[tuple[int, int]] = deque()
    load = [0] * workers
    perf = time.perf_counter
    wall0 = perf()
    for hashes in requests:
        t0 = perf()
        res = index.find_matches(hashes)
        match_lat.append(perf() - t0)
        scores = res.scores
        n_blocks = len(hashes)
        best = min(range(workers), key=lambda w: (n_blocks - scores.get((w, 0), 0) + load[w], w))
        overlap = scores.get((best, 0), 0)
        window.append((best, n_blocks))
        load[best] += n_blocks
        if len(window) > 256:
            w_old, b_old = window.popleft()
            load[w_old] -= b_old
        hit_blocks += overlap
        total_blocks += len(hashes)
        cache = lru[best]
        new = hashes[overlap:]
        if new:
            parent = hashes[overlap - 1] + ENGINE_OFFSET if overlap else None
            ev = stored_event(best, next_id[best], [(h + ENGINE_OFFSET, h) for h in new], parent)
            next_id[best] += 1
            t0 = perf()
            index.apply(ev)
            store_lat.append(perf() - t0)
        for h in reversed(hashes):  # leaf first: parents end up more recently used than children
            cache[h + ENGINE_OFFSET] = None
            cache.move_to_end(h + ENGINE_OFFSET)
        if len(cache) > capacity:
            victims = []
            while len(cache) > capacity:
                victims.append(cache.popitem(last=False)[0])
            ev = removed_event(best, next_id[best], victims)
            next_id[best] += 1
            t0 = perf()
            index.apply(ev)
            remove_lat.append(perf() - t0)
    wall = perf() - wall0
    all_lat = sorted(match_lat + store_lat + remove_lat)
    index_time = sum(all_lat)
    q = statistics.quantiles(all_lat, n=100)
    mq = statistics.quantiles(match_lat, n=100)
    bad = {k: v for k, v in index.counters.items() if k[1] not in ("ok",) and v}
    return {
        "requests": len(requests),
        "workers": workers,
        "capacity_blocks": capacity,
        "ops": len(all_lat),
        "matches": len(match_lat),
        "stored_events": len(store_lat),
        "removed_events": len(remove_lat),
        "ops_per_s_index_time": len(all_lat) / index_time,
        "ops_per_s_wall": len(all_lat) / wall,
        "p50_us": q[49] * 1e6,
        "p99_us": q[98] * 1e6,
        "max_us": all_lat[-1] * 1e6,
        "match_p50_us": mq[49] * 1e6,
        "match_p99_us": mq[98] * 1e6,
        "hit_rate": hit_blocks / max(1, total_blocks),
        "final_entries": index.blocks,
        "non_ok_outcomes": {f"{k[0]}.{k[1]}": v for k, v in bad.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="both", choices=["conversation", "synthetic", "both"])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--default-gc", action="store_true", help="keep CPython's default GC thresholds (as when embedded)")
    ap.add_argument("--out", default=str(RESULTS / "indexer_mooncake.json"))
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()  # what `kvr indexer` does at start
    names = list(TRACES) if args.trace == "both" else [args.trace]
    results = {name: replay(DATA / TRACES[name], args.workers, args.capacity) for name in names}
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'trace':<13} {'requests':>8} {'ops':>7} {'ops/s (index)':>14} {'ops/s (wall)':>13} {'p50 µs':>7} {'p99 µs':>7} {'hit rate':>8}")
    for name, r in results.items():
        print(
            f"{name:<13} {r['requests']:>8,} {r['ops']:>7,} {r['ops_per_s_index_time']:>14,.0f} {r['ops_per_s_wall']:>13,.0f} "
            f"{r['p50_us']:>7.1f} {r['p99_us']:>7.1f} {r['hit_rate']:>8.1%}"
        )


if __name__ == "__main__":
    main()
