"""Cost of the scheduler's pure core per decision (no NATS, no indexer): hashing + filters + scoring,
and a booking applied to / freed from the load tracker.

  .venv/bin/python bench/scheduler_core.py [--decisions 20000]

Shows what the service spends on its own logic; the rest of a select's latency is transport,
the overlap query and the shared runtime (decode/encode, tracing span).
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scheduler_fleet import Workload, machine, table, write_result
from schemas.api import Policy
from schemas.bookings import BookingAdd
from schemas.discovery import WorkerRecord
from schemas.hashing import request_hashes
from services.scheduler.candidates import candidates_from
from services.scheduler.load import LoadTracker
from services.scheduler.selector import Overlaps, SelectionInput, Selector


def run(n_workers: int, decisions: int, policy: str) -> dict:
    wl = Workload()
    rng = random.Random(1)
    cands = candidates_from(
        WorkerRecord(worker_id=w, pool="b", address="10.0.0.1", port=8000 + w, total_kv_blocks=100_000) for w in range(1, n_workers + 1)
    )
    tracker = LoadTracker(ttl_ms=10**12)
    selector = Selector(rng=random.Random(2))
    prompts = [wl.prompt(rng) for _ in range(512)]
    lat_us: list[float] = []
    live: list[str] = []
    for i in range(decisions):
        tokens = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        local, seq = request_hashes(tokens, 16)
        ov = Overlaps(device={(1 + (i % n_workers), 0): len(local) // 2})
        d = selector.select(cands, tracker, ov, SelectionInput(isl_tokens=len(tokens), block_size=16, hashes=seq, policy=Policy(policy)))
        c = d.decode.candidate
        tracker.add(BookingAdd(request_id=f"r{i}", router_id="b", pool="b", worker_id=c.worker_id, dp_rank=c.dp_rank, ts_ms=1,
                               isl_tokens=len(tokens), overlap_blocks=d.overlap_blocks, sequence_hashes=seq), 2)
        lat_us.append((time.perf_counter() - t0) * 1e6)
        live.append(f"r{i}")
        if len(live) > 256:  # keep ~256 requests in flight
            tracker.free(live.pop(0))
    lat_us.sort()
    q = lambda p: round(lat_us[int(p * (len(lat_us) - 1))], 1)  # noqa: E731
    return {"workers": n_workers, "policy": policy, "decisions": decisions, "p50_us": q(0.5), "p99_us": q(0.99),
            "decisions_per_s": round(decisions / (sum(lat_us) / 1e6))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=20_000)
    args = ap.parse_args()
    rows = [run(n, args.decisions, "kv") for n in (8, 64)] + [run(8, args.decisions, "round_robin")]
    print(table(rows, list(rows[0])))
    path = write_result("scheduler_core", {"date": datetime.date.today().isoformat(), "machine": machine(), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
