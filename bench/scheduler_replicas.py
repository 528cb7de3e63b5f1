"""Replica convergence lag: how long after a replica books a request do the other replicas apply it.

  .venv/bin/python bench/scheduler_replicas.py [--replicas 3] [--duration 10] [--concurrency 8]

`kvr indexer` + N `kvr scheduler` replicas on one local nats-server. Booked selects (then frees)
go through the `scheduler` queue group, so every replica books some and applies all. Each replica
records, for every booking event made by *another* replica, `applied_at − ts_ms` (the event's
timestamp is taken just before publishing); the table shows those lags per replica, read from
`/readyz`. Clocks are one machine's, so there is no skew.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scheduler_fleet import POOL, Workload, connect, machine, run_load, seed_fleet, table, write_result
from services.runtime.embedded import NatsServer
from services.runtime.procs import ServiceProcess

COLUMNS = ["replica", "remote_bookings", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "sync_timeouts"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.0, help="paced selects/s (0 = closed loop)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default="scheduler_replicas", help="result name under bench/results/")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="kvr-bench-replicas-"))
    server = NatsServer().start()
    env = {"KVR_LOG_LEVEL": "warning"}
    procs = [ServiceProcess("indexer", nats_url=server.url, pools=[POOL], env=env, log_path=str(logdir / "indexer.log"))]
    procs += [
        ServiceProcess("scheduler", args=["--router-id", f"r{i}", "--embedded-indexer", "false"], nats_url=server.url, pools=[POOL], env=env,
                       log_path=str(logdir / f"r{i}.log"))
        for i in range(args.replicas)
    ]
    try:
        nc = await connect(server.url)
        wl = Workload()
        await seed_fleet(nc, args.workers, wl)
        for p in procs:
            p.start()
        for p in procs:
            await asyncio.to_thread(p.wait_ready, 60)
        res = await run_load(nc, wl, args.duration, args.concurrency, True, rate=args.rate or None)
        await asyncio.sleep(0.5)
        rows: list[dict[str, object]] = []
        for i, p in enumerate(procs[1:]):
            # a replica too loaded to answer /readyz in time loses its row's figures, not the whole table
            scrape = p.scrape("/readyz")
            if not scrape.ok:
                rows.append({"replica": f"r{i}", "error": f"/readyz: {scrape.error}"})
                continue
            status = json.loads(scrape.body)
            lag = status["convergence_lag_ms"]
            rows.append({"replica": status["router_id"], "remote_bookings": lag["n"], "lag_p50_ms": lag["p50"],
                         "lag_p99_ms": lag["p99"], "lag_max_ms": lag["max"], "sync_timeouts": status["sync_timeouts"]})
        await nc.close()
    finally:
        for p in procs:
            p.terminate()
        server.cleanup()
    load = res.summary()
    print(f"load: {load['selections_per_s']} booked selects/s (+ one free each), select p50 {load['p50_ms']} ms, "
          f"p99 {load['p99_ms']} ms, errors {load['errors']}\n")
    failed = sum(1 for r in rows if "error" in r)
    print(table(rows, COLUMNS + (["error"] if failed else [])))
    if failed:
        print(f"\n{failed} of {len(rows)} replicas did not answer /readyz: their lags are missing")
    path = write_result(args.out, {
        "date": datetime.date.today().isoformat(), "machine": machine(), "args": vars(args), "load": load, "replicas": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
