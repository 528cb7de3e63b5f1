"""epp.query throughput and latency over NATS, separate processes vs one process.

Starts a real nats-server, registers a fleet in discovery, publishes KV events for shared prompt
prefixes, then drives `kvr.{pool}.epp.query` from this process:

* open loop at a fixed rate (the issue's targets: 1,000/s separate, 3,000/s one process), latency
  measured from send to reply;
* closed loop with N outstanding requests, for the highest rate the stack sustains.

Variants: `token_data` (nvext.token_data, no tokenization), `tokenize` (chat body rendered with the
chat template and tokenized by the bridge), `token_data_book` (book: true, each reply followed by
an untimed epp.cleanup free, as a gateway would). Modes: `separate-embedded-index` (kvr scheduler + kvr
epp-bridge: the default deployment, where the scheduler folds KVR_KV into its own index replica, as
Dynamo's router does), `separate` (kvr indexer + kvr scheduler --embedded-indexer false + kvr
epp-bridge: the remote-indexer layout, one more request/reply hop), `one-process` (kvr epp-bridge
--epp-embedded-scheduler --embedded-indexer) and
`bridge-only` (kvr epp-bridge in front of a stub scheduler that answers at once: the bridge's share),
and two floors: `nats-floor` (a bare nats-py subscription publishing a fixed reply) and
`responder-floor` (our `serve()` decoding the request and answering at once). Each row also records
the CPU share of every service process (% of one core).

    .venv/bin/python bench/epp_query.py                 # full table, ~2 minutes
    .venv/bin/python bench/epp_query.py --duration 3 --modes one-process --variants token_data
    .venv/bin/python bench/epp_query.py --modes one-process --variants token_data --loads target --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lib.driver import drive
from bench.lib.measure import cpu_seconds, phase_means_between
from bench.lib.plots import plot_open_loop
from bench.lib.stack import BLOCK, seed_fleet, start_stack
from bench.lib.tokenizer import build_tokenizer_dir
from services.epp_bridge.tokenizer import PoolTokenizer
from services.runtime.embedded import NatsServer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "capital", "France", "Paris", "story", "dragon", "route", "worker", "cache", "prefix"]


def make_payloads(variant: str, tok: PoolTokenizer, prefixes: list[list[int]], texts: list[str], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        k = rng.randrange(len(prefixes))
        body: dict[str, Any]
        if variant == "tokenize":
            body = {"model": "tiny", "messages": [{"role": "system", "content": texts[k]}, {"role": "user", "content": " ".join(rng.choices(WORDS, k=30))}]}
        else:
            body = {"model": "tiny", "prompt": "", "nvext": {"token_data": prefixes[k] + [rng.randrange(600) for _ in range(256)]}}
        out.append(msgspec.json.encode({"request_id": f"b-{i}", "body": body, "book": variant == "token_data_book"}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prefixes", type=int, default=64, help="distinct cached prompt prefixes")
    ap.add_argument("--modes", default="separate-embedded-index,separate,one-process,bridge-only",
                    help="separate-embedded-index (the default deployment), separate (remote indexer), one-process, bridge-only (the bridge in front of a stub scheduler that answers at once), "
                         "nats-floor / responder-floor (a process answering at once: the NATS client's and the responder's cost)")
    ap.add_argument("--variants", default="token_data,tokenize,token_data_book")
    ap.add_argument("--concurrency", type=int, default=32, help="outstanding requests in the closed-loop run")
    ap.add_argument("--client", choices=("wire", "nats-py"), default="wire",
                    help="the generator's NATS client: its own minimal one (default, least CPU) or nats-py")
    ap.add_argument("--tokenize-threads", type=int, default=0, help="--epp-tokenize-threads of the bridge")
    ap.add_argument("--loads", default="light,target,closed", help="which loads to run: light, target (the issue's rate), closed")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per load (the p99 of a 2-core machine varies run to run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "epp_query.json"))
    args = ap.parse_args()
    targets = {"separate": 1000.0, "separate-embedded-index": 1000.0, "one-process": 3000.0, "bridge-only": 1000.0, "nats-floor": 3000.0, "responder-floor": 3000.0}
    # well below capacity: latency without queueing
    light = {"separate": 250.0, "separate-embedded-index": 250.0, "one-process": 500.0, "bridge-only": 250.0, "nats-floor": 500.0, "responder-floor": 500.0}
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="kvr-epp-bench-"))
    tok_dir = build_tokenizer_dir(tmp / "tok")
    tok = PoolTokenizer.load(tok_dir)
    texts = [" ".join(rng.choices(WORDS, k=300)) for _ in range(args.prefixes)]
    # Cached prefix = the chat-rendered system prompt, cut to whole blocks, so both variants can hit.
    prefixes = []
    for text in texts:
        ids = tok.encode_chat([{"role": "system", "content": text}], add_generation_prompt=False)
        prefixes.append(ids[: (len(ids) // BLOCK) * BLOCK])
    rows = []
    scrape_failures = 0
    for mode in args.modes.split(","):
        server = NatsServer().start()
        logs = tmp / mode
        logs.mkdir()
        procs = start_stack(mode, server.url, tok_dir, logs, args.tokenize_threads)
        try:
            async def seed(url: str = server.url) -> None:
                nc = await nats.connect(url)
                await seed_fleet(nc, args.workers, prefixes)
                await nc.close()

            floor = mode.endswith("-floor")
            if mode != "bridge-only" and not floor:
                asyncio.run(seed())
            for variant in args.variants.split(","):
                if floor and variant != "token_data":
                    continue
                payloads = make_payloads(variant, tok, prefixes, texts, 4000, rng)
                book = variant == "token_data_book"
                loads = {"light": light[mode], "target": targets[mode], "closed": None}
                for rate in [loads[name] for name in args.loads.split(",") for _ in range(args.repeat)]:
                    bridge = procs[-1]  # the bridge comes last (a floor's stub has no /metrics)
                    assert server.proc is not None  # started
                    before = bridge.scrape("/metrics")
                    cpu0, t0 = {p.proc.pid: cpu_seconds(p.proc.pid) for p in procs if p.proc is not None}, time.perf_counter()
                    gen0, nats0 = cpu_seconds(os.getpid()), cpu_seconds(server.proc.pid)
                    res = asyncio.run(drive(server.url, payloads, rate, args.concurrency, args.duration, book, args.client))
                    wall = time.perf_counter() - t0
                    res["generator_cpu_pct"] = round((cpu_seconds(os.getpid()) - gen0) / wall * 100)
                    res["nats_server_cpu_pct"] = round((cpu_seconds(server.proc.pid) - nats0) / wall * 100)
                    # A /metrics scrape that times out under load loses the phase means of this row, not the run.
                    res["bridge_phase_mean_us"], failed = phase_means_between(before, bridge.scrape("/metrics"))
                    res["metrics_scrape_error"] = failed
                    scrape_failures += failed is not None
                    # CPU of each service process over the measurement (incl. warm-up), % of one core
                    res["service_cpu_pct"] = [round((cpu_seconds(pid) - c) / wall * 100) for pid, c in cpu0.items()]
                    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    row = {"mode": mode, "variant": variant, "load": f"open {rate:.0f}/s" if rate else f"closed c={args.concurrency}", **res}
                    rows.append(row)
                    print(f"{mode:23} {variant:16} {row['load']:14} ok/s={res['throughput_qps']:8.1f} p50={res['p50_ms']:7.3f}ms "
                          f"p99={res['p99_ms']:7.3f}ms errors={res['errors']} bridge µs={res['bridge_phase_mean_us'] if failed is None else 'missing: ' + failed}", flush=True)
        finally:
            for p in procs:
                p.terminate()
            server.cleanup()

    print()
    print(f"{'mode':23} {'variant':16} {'load':14} {'ok/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'bridge µs':>10} {'cpu %':>12} {'gen/nats %':>10} {'load1':>6} errors")
    for r in rows:
        phases = r["bridge_phase_mean_us"]
        own = "-" if phases is None else f"{phases.get('parse', 0) + phases.get('tokenize', 0):.1f}"
        cpu = "+".join(str(c) for c in r["service_cpu_pct"])
        note = " ".join([*([str(r["errors"])] if r["errors"] else []), *([f"/metrics: {r['metrics_scrape_error']}"] if r["metrics_scrape_error"] else [])])
        print(f"{r['mode']:23} {r['variant']:16} {r['load']:14} {r['throughput_qps']:9.1f} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} "
              f"{r['p99_ms']:8.3f} {own:>10} {cpu:>12} {r['generator_cpu_pct']:>4}/{r['nats_server_cpu_pct']:<5} {r['loadavg_1m']:6.2f} {note}")
    if scrape_failures:
        print(f"\n{scrape_failures} of {len(rows)} rows lost the bridge's phase means (its /metrics did not answer; bridge µs '-')")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
            "duration_s": args.duration, "client": args.client, "workers": args.workers, "tokenize_threads": args.tokenize_threads, "prefixes": args.prefixes, "block_size": BLOCK,
            "metrics_scrape_failures": scrape_failures}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    png = plot_open_loop(rows, targets, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
