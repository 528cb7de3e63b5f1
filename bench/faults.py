"""Faults under load and hostile input, the long runs: events lost, replicas, errors, convergence,
leaked bookings, memory. The short runs of the same code are tests/faults/ (and tests/fuzz/).

    .venv/bin/python bench/faults.py                                  # everything (~15 min on 2 cores)
    .venv/bin/python bench/faults.py --only kill-indexer,kill-nats    # some scenarios
    .venv/bin/python bench/faults.py --only cluster --down-s 8        # the 3-node cluster, a longer outage

Scenarios (docs/reliability.md says what each checks):
  kill-indexer, kill-scheduler, kill-nats  one stack (nats-server, indexer ×2, scheduler ×2, epp-bridge,
                                           mock-workers): SIGKILL indexer-a, then scheduler-s1, then
                                           nats-server, each under load, each restarted after --down-s
  cluster                                  3-node cluster, R3 streams: SIGKILL the node leading KVR_KV,
                                           then the one leading KVR_BOOKINGS, each restarted after --down-s
  fuzz, backlog, flood                     bench/hostile_input.py's scenarios, called with this run's sizes

Prints a table per group and writes bench/results/faults.json; with --plot, a timeline of every
fault (requests sent per 0.5 s, by outcome, with the fault, repair and convergence marked) to
docs/img/faults_timeline.png. Service logs of the run are under --workdir.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import hostile_input
from bench.faultlib.scenarios import FaultResult, LoadConfig, Session, kill_nats, kill_process, kill_stream_leader
from bench.faultlib.stack import NAMES, Stack, StackConfig
from bench.lib.plots import save_figure
from services.runtime.logs import setup_logging

SINGLE = ("kill-indexer", "kill-scheduler", "kill-nats")
ALL = (*SINGLE, "cluster", "fuzz", "backlog", "flood")
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


async def single_server(args: argparse.Namespace, load: LoadConfig, wanted: set[str]) -> list[FaultResult]:
    stack = Stack(StackConfig(workers=args.workers), Path(args.workdir) / "single")
    progress("single server: starting nats-server and 7 service processes")
    await stack.start()
    out: list[FaultResult] = []
    try:
        session = Session(stack, load, progress=progress)
        for _ in range(args.repeat):
            if "kill-indexer" in wanted:
                out.append(await kill_process(session, "indexer-a"))
                progress(out[-1].summary())
            if "kill-scheduler" in wanted:
                out.append(await kill_process(session, "scheduler-s1"))
                progress(out[-1].summary())
            if "kill-nats" in wanted:
                out.append(await kill_nats(session))
                progress(out[-1].summary())
    finally:
        await stack.stop()
    return out


async def cluster(args: argparse.Namespace, load: LoadConfig) -> list[FaultResult]:
    stack = Stack(StackConfig(cluster=True, workers=args.workers), Path(args.workdir) / "cluster")
    progress("cluster: starting 3 nats-server nodes (R3 streams) and 7 service processes")
    await stack.start()
    out: list[FaultResult] = []
    try:
        session = Session(stack, load, progress=progress)
        for _ in range(args.repeat):
            for stream in (NAMES.kv_stream, NAMES.bookings_stream):
                out.append(await kill_stream_leader(session, stream))
                progress(out[-1].summary())
    finally:
        await stack.stop()
    return out


def fault_table(results: list[FaultResult]) -> str:
    def codes(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "0"

    lines = [
        "| fault | events accepted | lost | replicas identical | requests | errors during the fault | errors outside it "
        "| converged after (s) | bookings left | largest RSS growth (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        growth = {k: (r.rss_after_mb.get(k) or 0) - (v or 0) for k, v in r.rss_before_mb.items() if v is not None}
        worst = max(growth.items(), key=lambda kv: kv[1]) if growth else ("-", 0.0)
        lines.append(
            f"| {r.fault} | {r.accepted:,} | {r.lost} | {'yes' if r.identical else 'NO ' + str(r.replicas.get('diverged'))} "
            f"| {sum(r.requests.values()):,} | {codes(r.errors_during_fault)} | {codes(r.errors_outside_fault)} "
            f"| {r.converge_s} | {r.leaked_bookings} | {worst[1]:+.1f} ({worst[0]}) |"
        )
    return "\n".join(lines)


def plot(results: list[FaultResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.4 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        t0, step = r.started_at, 0.5
        end = max((o[0] for o in r.outcomes), default=t0) - t0
        bins = int(end / step) + 1
        ok, bad = [0] * bins, [0] * bins
        for start, _finish, code in r.outcomes:  # by the time the request was sent
            (ok if code == "ok" else bad)[int((start - t0) / step)] += 1
        xs = [i * step for i in range(bins)]
        ax.bar(xs, ok, width=step, color="tab:green", label="answered ok", align="edge")
        ax.bar(xs, bad, width=step, bottom=ok, color="tab:red", label="failed", align="edge")
        for at, label, style in ((r.fault_at, "fault", "k-"), (r.repaired_at, "repair", "k--"), (r.converged_at, "converged", "b:")):
            if at:
                ax.axvline(at - t0, color=style[0], linestyle=style[1:], linewidth=1)
                ax.text(at - t0, ax.get_ylim()[1] * 0.9, f" {label}", fontsize=7)
        ax.set_title(r.fault, fontsize=9)
        ax.set_ylabel("requests sent / 0.5 s", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the load started")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=90)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def repo_relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    wanted = set(args.only.split(",")) if args.only else set(ALL)
    unknown = wanted - set(ALL)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {sorted(unknown)}; choose from {', '.join(ALL)}")
    load = LoadConfig(rate=args.rate, probe_rate=args.probe_rate, warmup_s=args.warmup_s, down_s=args.down_s,
                      after_s=args.after_s, cleanup_window_s=args.window_s)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # one run's logs only
    workdir.mkdir(parents=True)
    res: dict[str, Any] = {"machine": machine(), "load_average_before": os.getloadavg()}
    faults: list[FaultResult] = []
    if wanted & set(SINGLE):
        faults += await single_server(args, load, wanted)
    if "cluster" in wanted:
        faults += await cluster(args, load)
    res["faults"] = [r.as_dict() for r in faults]
    hostile: dict[str, Any] = {}
    if "fuzz" in wanted:
        progress(f"fuzz: {args.fuzz_requests:,} inputs per endpoint (7), {args.fuzz_messages:,} messages per stream (3)")
        hostile["fuzz"] = await hostile_input.run_fuzz(args.fuzz_requests, args.fuzz_messages, args.seed)
    if "backlog" in wanted:
        progress(f"backlog: {args.backlog_messages} messages of {args.backlog_blocks:,} blocks before the indexer starts")
        hostile["backlog"] = await hostile_input.backlog(args.backlog_messages, args.backlog_blocks, workdir)
    if "flood" in wanted:
        progress(f"flood: {args.flood_blocks:,} blocks from {args.flood_workers:,} unregistered workers")
        hostile["flood"] = await hostile_input.flood(args.flood_workers, args.flood_blocks, workdir)
    res["hostile"] = hostile
    res["load_average_after"] = os.getloadavg()
    res["wall_s"] = round(time.monotonic() - T0, 1)
    if faults:
        print("\n" + fault_table(faults))
    if hostile:
        print("\n" + hostile_input.table(hostile))
    if faults and args.plot:
        plot(faults, Path(args.plot))
        res["plot"] = repo_relative(args.plot)
        print(f"wrote {args.plot}")
    res["ok"] = all(r.ok() for r in faults)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(ALL)}")
    ap.add_argument("--rate", type=float, default=30.0, help="gateway queries per second during each fault")
    ap.add_argument("--probe-rate", type=float, default=50.0, help="probe KV messages per second")
    ap.add_argument("--workers", type=int, default=4, help="simulated workers")
    ap.add_argument("--warmup-s", type=float, default=15.0, help="load before each fault")
    ap.add_argument("--down-s", type=float, default=5.0, help="how long the killed process or server stays down")
    ap.add_argument("--after-s", type=float, default=15.0, help="load after convergence")
    ap.add_argument("--window-s", type=float, default=10.0, help="cleanup window before bookings are counted")
    ap.add_argument("--repeat", type=int, default=1, help="run each fault this many times (same stack)")
    ap.add_argument("--fuzz-requests", type=int, default=10_000, help="per endpoint")
    ap.add_argument("--fuzz-messages", type=int, default=10_000, help="per stream (KV, discovery, bookings)")
    ap.add_argument("--backlog-messages", type=int, default=200)
    ap.add_argument("--backlog-blocks", type=int, default=8192)
    ap.add_argument("--flood-workers", type=int, default=1000)
    ap.add_argument("--flood-blocks", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=".kvr/bench-faults", help="service logs of the run")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "faults_timeline.png"), help="timeline PNG ('' = none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = ap.parse_args()
    setup_logging("console", "error")  # the in-process fuzz stack logs every rejected request at debug
    res = asyncio.run(amain(args))
    res["args"] = {k: (repo_relative(v) if k in ("out", "plot", "workdir") and v else v) for k, v in vars(args).items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({res['wall_s']} s)")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
