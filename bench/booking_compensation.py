"""Bookings whose client gave up at the bridge's deadline: how many are left after the cleanup window.

A real nats-server, the real scheduler and EPP bridge (in this process), and an indexer responder
that answers each match after --match-delay-s. The scheduler runs with --max-inflight selects at a
time, so a burst of --queries booking queries queues up in front of it (an overloaded scheduler):
most of them pass the bridge's --select-timeout-s and get `timeout`, but the scheduler still runs
them, seconds later. After the last select has run, the script waits --window-s and counts the
bookings the scheduler still holds although no query got an answer for them.

    .venv/bin/python bench/booking_compensation.py [--queries 300] [--max-inflight 4] [--match-delay-s 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nats
    from prometheus_client import REGISTRY

    from bench.lib.inproc import record, register, running_scheduler, start_bridge
    from schemas import codec
    from schemas.api import MatchReply, MatchRequest
    from schemas.subjects import Names
    from services.runtime.embedded import NatsServer
    from services.runtime.logs import setup_logging
    from services.runtime.responder import serve

    NAMES, POOL = Names(), "p"

    setup_logging("console", "error")
    server = NatsServer().start()
    matches = 0
    try:
        nc = await nats.connect(server.url)

        async def slow_match(req: MatchRequest, _msg: Any) -> MatchReply:
            nonlocal matches
            await asyncio.sleep(args.match_delay_s)
            matches += 1
            return MatchReply(block_size=4, scores=[], tier_scores={}, tree_sizes=[], stream_seq=0)

        await serve(nc, NAMES.match(POOL), MatchRequest, slow_match, queue="indexer", max_inflight=1024)
        flags = ["--router-id", "s1", "--match-timeout-s", "60", "--block-size", "4", "--max-inflight", str(args.max_inflight),
                 "--log-level", "error"]
        async with running_scheduler(server.url, "--embedded-indexer", "false", *flags, pool=POOL) as app:
            await register(nc, [record(w) for w in range(1, 5)])
            bridge = await start_bridge(nc, server.url, "--pool", POOL, "--epp-select-timeout-s", str(args.select_timeout_s),
                                        "--log-level", "error")
            assert bridge.watcher is not None
            while len(app.candidates(POOL)) < 4 or len(bridge.watcher.directory.live(POOL)) < 4:
                await asyncio.sleep(0.02)

            async def query(i: int) -> str:
                payload = {"request_id": f"q-{i}", "body": {"prompt": [1 + i % 7] * 16}}
                msg = await nc.request(NAMES.epp_query(POOL), codec.encode_json(payload), timeout=args.select_timeout_s + 5)
                return "ok" if b'"status":"ok"' in msg.data else "timeout" if b'"timeout"' in msg.data else "error"

            t0 = time.monotonic()
            outcomes = await asyncio.gather(*(query(i) for i in range(args.queries)))
            answered = {f"q-{i}" for i, o in enumerate(outcomes) if o == "ok"}
            while matches < args.queries:  # every select, late ones included, has been decided
                await asyncio.sleep(0.05)
            t_last = time.monotonic() - t0
            await asyncio.sleep(args.window_s)
            held = set(app.export_state(POOL).bookings)
            result = {
                "queries": args.queries, "answered": len(answered), "timeouts": outcomes.count("timeout"),
                "last_select_s": round(t_last, 2), "bookings_held": len(held),
                "leaked_bookings": len(held - answered),  # booked, but nobody was told where
                "compensations": {o: REGISTRY.get_sample_value("kvr_epp_compensating_frees_total", {"outcome": o}) or 0
                                  for o in ("freed", "cancelled", "not_booked", "error")},
            }
            await bridge.stop()
        await nc.close()
        return result
    finally:
        server.cleanup()


def _repo_relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--max-inflight", type=int, default=4, help="the scheduler's --max-inflight")
    ap.add_argument("--match-delay-s", type=float, default=0.1)
    ap.add_argument("--select-timeout-s", type=float, default=1.0, help="the bridge's --epp-select-timeout-s")
    ap.add_argument("--window-s", type=float, default=3.0, help="cleanup window after the last select ran")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "booking_compensation.json"))
    args = ap.parse_args()
    result = asyncio.run(run(args))
    for key, value in result.items():
        print(f"{key:<18} {value}")
    params = vars(args) | {"out": _repo_relative(args.out)}
    out = {"params": params, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "result": result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
