"""Selection throughput and latency of `kvr scheduler` with a live indexer, everything local.

  .venv/bin/python bench/scheduler_select.py [--duration 10] [--concurrency 4,8,16,32] [--workers 8]

Two deployments: `nats` = `kvr indexer` + `kvr scheduler --embedded-indexer false` as separate
processes (the scheduler asks the indexer over NATS), `one-process` = `kvr scheduler
--embedded-indexer` (the default: its own index replica). For each: selects with
`book: false` (decision only) and `book: true` (decision + booking published to KVR_BOOKINGS and
applied from the stream before the reply; the client frees each booking afterwards).
Each runs closed-loop at several client counts (throughput and latency at each); `--rate-nats` /
`--rate-one-process` add runs paced at a fixed rate.
A real nats-server runs on loopback; the load generator is this process (same 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scheduler_fleet import POOL, Workload, connect, machine, run_load, seed_fleet, table, write_result
from services.runtime.embedded import NatsServer
from services.runtime.procs import ServiceProcess


async def bench_mode(mode: str, args: argparse.Namespace, logdir: Path) -> list[dict]:
    server = NatsServer().start()
    procs: list[ServiceProcess] = []
    env = {"KVR_LOG_LEVEL": "warning"}
    try:
        nc = await connect(server.url)
        wl = Workload()
        await seed_fleet(nc, args.workers, wl)
        sched_args = ["--router-id", "bench-1"]
        if mode == "nats":
            procs.append(ServiceProcess("indexer", nats_url=server.url, pools=[POOL], env=env, log_path=str(logdir / "indexer.log")))
            sched_args += ["--embedded-indexer", "false"]
        else:
            sched_args.append("--embedded-indexer")
        procs.append(ServiceProcess("scheduler", args=sched_args, nats_url=server.url, pools=[POOL], env=env,
                                    log_path=str(logdir / f"scheduler-{mode}.log")))
        for p in procs:
            p.start()
        for p in procs:
            await asyncio.to_thread(p.wait_ready, 60)
        rows = []
        target = args.rate_nats if mode == "nats" else args.rate_one_process
        for book in (False, True):
            for conc in args.concurrency:
                runs = [(await run_load(nc, wl, args.duration, conc, book, warmup_s=args.warmup)).summary() for _ in range(args.repeat)]
                runs.sort(key=lambda r: r["selections_per_s"])
                median = runs[len(runs) // 2]
                rows.append({"mode": mode, "book": book, "load": f"closed loop x{conc}", **median,
                             "runs_per_s": [r["selections_per_s"] for r in runs], "runs_p99_ms": [r["p99_ms"] for r in runs]})
            if target:
                res = await run_load(nc, wl, args.duration, args.paced_concurrency, book, warmup_s=args.warmup, rate=target)
                rows.append({"mode": mode, "book": book, "load": f"paced {target:g}/s", **res.summary()})
        await nc.close()
        return rows
    finally:
        for p in procs:
            p.terminate()
        server.cleanup()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[4, 8, 16, 32],
                    help="closed-loop client counts, comma-separated")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--modes", default="nats,one-process")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the table shows the median run by throughput")
    ap.add_argument("--rate-nats", type=float, default=0.0, help="paced run at the issue's target rate (0 = skip)")
    ap.add_argument("--rate-one-process", type=float, default=0.0, help="paced run at the issue's target rate (0 = skip)")
    ap.add_argument("--paced-concurrency", type=int, default=32)
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="kvr-bench-sched-"))
    rows: list[dict] = []
    load_before = os.getloadavg()
    for mode in args.modes.split(","):
        rows += await bench_mode(mode, args, logdir)
    cols = ["mode", "book", "load", "selections_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors", "kv_hit_ratio", "runs_per_s"]
    print(table(rows, cols))
    path = write_result("scheduler_select", {
        "date": datetime.date.today().isoformat(), "machine": machine(), "args": vars(args), "rows": rows,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    print(f"\nwrote {path}\nservice logs: {logdir}")  # a temporary directory: printed, not recorded


if __name__ == "__main__":
    asyncio.run(main())
