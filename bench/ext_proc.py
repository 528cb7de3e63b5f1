"""Full ext_proc lifecycles per second through the EPP bridge's gRPC endpoint picker.

One lifecycle is what a GAIE gateway does per HTTP request (FULL_DUPLEX_STREAMED both ways, as GAIE
configures Envoy): request headers + body → the routing decision (headers answer + the body streamed
back) → response headers + a streamed response body (first chunk = prefill_complete, end of stream =
free) → end of the gRPC stream. The load generator is this process, driving the project's ext_proc
client (`services/epp_bridge/extproc_client.py`, Envoy's protos and message order); nats-server and
every service run on the same machine.

Layouts, side by side in one run:
* `floor`: an ext_proc server that answers every message at once without deciding (fixed destination,
  body echoed): the cost of gRPC + protobuf + the generator, i.e. the ceiling of any Python picker;
* `1-replica`: `kvr scheduler` (with its index replica: the default layout) + one `kvr epp-bridge
  --grpc-port`;
* `2-replicas`: the same scheduler + two bridges, the generator alternating between them.
Each booked request makes three booking events (add, prefill_complete, free), each a JetStream
publish the scheduler applies from the stream.

Loads: open loop at `--rate` (decision latency counted from each request's due time, so queueing is
not hidden) and a closed loop with `--concurrency` lifecycles in flight (capacity). Reported per row:
lifecycles/s completed, frees confirmed by the scheduler per second (from the bridges' metrics),
decision latency p50/p90/p99 (first request message → last request-phase answer), whole-lifecycle
p50/p99, errors, CPU share of every process, and bookings left open after the run.

    .venv/bin/python bench/ext_proc.py                                  # default: all layouts, ~2 min
    .venv/bin/python bench/ext_proc.py --duration 3 --layouts floor,1-replica --loads closed   # smoke run
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

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lib.measure import cpu_seconds, percentile
from bench.lib.plots import save_figure
from bench.lib.stack import BLOCK, NAMES, POOL, seed_fleet
from schemas.api import StateReply, StateRequest
from services.epp_bridge import extproc_protocol as xp
from services.epp_bridge.extproc_client import ExtProcClient
from services.runtime.embedded import NatsServer, free_port
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request

RESPONSE = (b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n', b"data: [DONE]\n\n")
TARGET_RATE = 2000.0
P99_TARGET_MS = 10.0


# --- the floor server ------------------------------------------------------------------------


async def floor_server(port: int) -> None:
    """Answers like a picker that has already decided: same messages, no routing work."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    headers = {xp.DESTINATION_KEY: "10.0.0.1:8000", "x-worker-instance-id": "1", "x-dp-rank": "0"}

    class Floor(pb_grpc.ExternalProcessorServicer):
        async def Process(self, request_iterator, context):
            body = bytearray()
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_body":
                    body += req.request_body.body
                    if req.request_body.end_of_stream:
                        yield xp.request_headers_response(xp.routing_common(headers), headers[xp.DESTINATION_KEY])
                        for resp in xp.streamed_request_body(bytes(body), True):
                            yield resp
                elif kind == "response_headers":
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif kind == "response_body":
                    yield xp.echo_response_body(req.response_body.body, req.response_body.end_of_stream)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class FloorProcess:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: Any = None

    def start(self) -> FloorProcess:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(self.port)])
        return self

    def wait_ready(self, timeout: float) -> FloorProcess:
        async def probe() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                async with ExtProcClient(f"127.0.0.1:{self.port}") as c:
                    try:
                        await c.lifecycle(b'{"prompt": [1]}', timeout=1)
                        return
                    except Exception:  # noqa: BLE001 - not listening yet
                        await asyncio.sleep(0.1)
            raise TimeoutError("floor server not up")

        asyncio.run(probe())
        return self

    def metrics(self) -> str:
        return ""

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


# --- the stack -------------------------------------------------------------------------------


def wait_grpc_ready(target: str, timeout: float = 60) -> None:
    async def probe() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with ExtProcClient(target) as c:
                try:
                    if await c.health("readiness", timeout=1) == "SERVING":
                        return
                except Exception:  # noqa: BLE001
                    pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{target} not SERVING")

    asyncio.run(probe())


def start_layout(layout: str, url: str, logs: Path, extra_bridge: list[str]) -> tuple[list[Any], list[str]]:
    """(processes, ext_proc targets)."""
    if layout == "floor":
        port = free_port()
        return [FloorProcess(port).start().wait_ready(60)], [f"127.0.0.1:{port}"]
    replicas = int(layout.split("-")[0])
    quiet = ["--log-level", "warning"]
    procs: list[Any] = [ServiceProcess("scheduler", ["--block-size", str(BLOCK), *quiet], nats_url=url, pools=[POOL], log_path=str(logs / "scheduler.log"))]
    targets = []
    for i in range(replicas):
        port = free_port()
        targets.append(f"127.0.0.1:{port}")
        args = ["--grpc-port", str(port), "--grpc-host", "127.0.0.1", *quiet, *extra_bridge]
        procs.append(ServiceProcess("epp-bridge", args, nats_url=url, pools=[POOL], log_path=str(logs / f"bridge{i}.log")))
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready(60)
    for t in targets:
        wait_grpc_ready(t)
    return procs, targets


def frees_confirmed(procs: list[Any], timeout: float = 5.0) -> tuple[float, str | None]:
    """Frees the scheduler confirmed, summed over the bridges' /metrics; (nan, why) when a scrape failed:
    a bridge too loaded to answer in time costs this figure, not the run."""
    total = 0.0
    for p in procs:
        if not isinstance(p, ServiceProcess):  # the floor server has no /metrics
            continue
        scrape = p.scrape("/metrics", timeout)
        if scrape.error is not None:
            return float("nan"), f"{p.command} /metrics: {scrape.error}"
        for line in scrape.body.splitlines():
            if line.startswith('kvr_epp_extproc_booking_updates_total{outcome="known",phase="free"}') or line.startswith(
                'kvr_epp_extproc_booking_updates_total{phase="free",outcome="known"}'
            ):
                total += float(line.rsplit(" ", 1)[1])
    return total, None


async def open_bookings(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return len((await request(nc, NAMES.scheduler_state(POOL), StateRequest(), StateReply, timeout=5)).bookings)
    finally:
        await nc.close()


async def seed(url: str, workers: int, prefixes: list[list[int]]) -> None:
    nc = await nats.connect(url)
    await seed_fleet(nc, workers, prefixes)
    await nc.close()


async def settle_bookings(url: str, limit: float) -> int:
    deadline = time.monotonic() + limit
    while True:
        n = await open_bookings(url)
        if n == 0 or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.25)


# --- the generator ---------------------------------------------------------------------------


async def drive(targets: list[str], bodies: list[bytes], rate: float | None, concurrency: int, duration: float) -> dict[str, Any]:
    clients = [ExtProcClient(t) for t in targets]
    decision_ms: list[float] = []
    lifecycle_ms: list[float] = []
    errors: dict[str, int] = {}
    counter = {"n": 0, "done": 0}
    measuring = {"on": False}

    async def one(due: float) -> None:
        k = counter["n"]
        counter["n"] += 1
        client = clients[k % len(clients)]
        s = client.stream(timeout=10)
        try:
            d = await s.request(bodies[k % len(bodies)])
            decided = time.perf_counter()
            if not d.routed:
                code = (d.error or {}).get("error", {}).get("code", str(d.status))
                errors[code] = errors.get(code, 0) + 1
                await s.finish()
                return
            await s.response(RESPONSE)
            await s.finish()
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            s.cancel()
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if measuring["on"]:
            decision_ms.append((decided - due) * 1000)
            lifecycle_ms.append((time.perf_counter() - due) * 1000)
            counter["done"] += 1

    # warm-up (not measured)
    for _ in range(50):
        await one(time.perf_counter())
    errors.clear()
    measuring["on"] = True
    start = time.perf_counter()
    if rate is None:
        stop = start + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                await one(time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        tasks: set[asyncio.Task[None]] = set()
        total = int(duration * rate)
        k = 0
        while k < total:
            now = time.perf_counter()
            while k < total and start + k / rate <= now:
                task = asyncio.create_task(one(start + k / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
            if k < total:
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
        if tasks:
            await asyncio.wait(tasks, timeout=30)
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.close()
    dec, life = sorted(decision_ms), sorted(lifecycle_ms)
    return {
        "lifecycles": counter["done"],
        "lifecycles_per_s": round(counter["done"] / elapsed, 1),
        "elapsed_s": round(elapsed, 2),
        "errors": errors,
        "decision_p50_ms": round(percentile(dec, 0.50), 3),
        "decision_p90_ms": round(percentile(dec, 0.90), 3),
        "decision_p99_ms": round(percentile(dec, 0.99), 3),
        "lifecycle_p50_ms": round(percentile(life, 0.50), 3),
        "lifecycle_p99_ms": round(percentile(life, 0.99), 3),
    }


def make_bodies(prefixes: list[list[int]], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(n):
        tokens = rng.choice(prefixes) + [rng.randrange(600) for _ in range(256)]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "(pre-tokenized)"}], "stream": True, "nvext": {"token_data": tokens}}
        out.append(json.dumps(body).encode())
    return out


def plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    labels = [f"{r['layout']}\n{r['load']}" for r in rows]
    x = range(len(rows))
    a1.bar(x, [r["lifecycles_per_s"] for r in rows], color="#4a7ab0")
    a1.axhline(TARGET_RATE, color="red", linestyle="--", linewidth=1, label=f"target {TARGET_RATE:.0f}/s")
    a1.set_ylabel("lifecycles / s")
    a2.bar(x, [r["decision_p99_ms"] for r in rows], color="#b07a4a")
    a2.axhline(P99_TARGET_MS, color="red", linestyle="--", linewidth=1, label=f"p99 target {P99_TARGET_MS:.0f} ms")
    a2.set_ylabel("decision p99 (ms, log)")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--floor-server":
        asyncio.run(floor_server(int(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    ap.add_argument("--layouts", default="floor,1-replica,2-replicas")
    ap.add_argument("--loads", default="closed,light,target",
                    help="closed (--concurrency in flight: capacity), light (open loop at --light-rate: latency without queueing), "
                         "target (open loop at --rate, the issue's 2,000/s)")
    ap.add_argument("--light-rate", type=float, default=100.0)
    ap.add_argument("--rate", type=float, default=TARGET_RATE, help="open-loop lifecycles/s")
    ap.add_argument("--concurrency", type=int, default=64, help="lifecycles in flight in the closed loop")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prefixes", type=int, default=64)
    ap.add_argument("--bridge-args", default="", help="extra flags for every bridge (e.g. '--epp-embedded-scheduler')")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ext_proc.json"))
    args = ap.parse_args()
    rng = random.Random(11)
    prefixes = [[rng.randrange(600) for _ in range(512)] for _ in range(args.prefixes)]
    bodies = make_bodies(prefixes, 2000, rng)
    tmp = Path(tempfile.mkdtemp(prefix="kvr-extproc-bench-"))
    rows = []
    for layout in args.layouts.split(","):
        server = NatsServer().start()
        logs = tmp / layout
        logs.mkdir()
        procs: list[Any] = []
        try:
            procs, targets = start_layout(layout, server.url, logs, args.bridge_args.split())
            if layout != "floor":
                asyncio.run(seed(server.url, args.workers, prefixes))
            assert server.proc is not None
            nats_pid = server.proc.pid
            for load in args.loads.split(","):
                rate = {"target": args.rate, "light": args.light_rate}.get(load)
                pids = {p.proc.pid: cpu_seconds(p.proc.pid) for p in procs}
                gen0, nats0, t0 = cpu_seconds(os.getpid()), cpu_seconds(nats_pid), time.perf_counter()
                frees0, scrape_error = frees_confirmed(procs)
                res = asyncio.run(drive(targets, bodies, rate, args.concurrency, args.duration))
                wall = time.perf_counter() - t0
                res["generator_cpu_pct"] = round((cpu_seconds(os.getpid()) - gen0) / wall * 100)
                res["nats_server_cpu_pct"] = round((cpu_seconds(nats_pid) - nats0) / wall * 100)
                res["service_cpu_pct"] = [round((cpu_seconds(pid) - c) / wall * 100) for pid, c in pids.items()]
                # Let the last frees (and any late-booking compensation) land before the next load.
                res["open_bookings_after"] = asyncio.run(settle_bookings(server.url, 30)) if layout != "floor" else 0
                # frees the scheduler confirmed for this load's requests (counted once they landed)
                frees1, scrape_error_after = frees_confirmed(procs)
                scrape_error = scrape_error or scrape_error_after
                res["frees_per_s"] = round((frees1 - frees0) / res["elapsed_s"], 1) if layout != "floor" and scrape_error is None else None
                res["metrics_scrape_error"] = scrape_error
                res["loadavg_1m"] = round(os.getloadavg()[0], 2)
                row = {"layout": layout, "load": f"open {rate:.0f}/s" if rate else f"closed c={args.concurrency}", **res}
                rows.append(row)
                print(f"{layout:11} {row['load']:13} lifecycles/s={res['lifecycles_per_s']:8.1f} frees/s={res['frees_per_s'] if scrape_error is None else 'missing: ' + scrape_error} "
                      f"decision p50={res['decision_p50_ms']:.2f} p99={res['decision_p99_ms']:.2f} ms errors={res['errors']}", flush=True)
        finally:
            for p in procs:
                p.terminate()
            server.cleanup()
    print()
    print(f"{'layout':11} {'load':13} {'life/s':>8} {'frees/s':>8} {'dec p50':>8} {'dec p90':>8} {'dec p99':>8} {'life p99':>9} "
          f"{'cpu % (services)':>17} {'gen/nats %':>10} {'open':>5} {'load1':>6} errors")
    for r in rows:
        cpu = "+".join(str(c) for c in r["service_cpu_pct"])
        frees = "-" if r["frees_per_s"] is None else f"{r['frees_per_s']:.1f}"
        print(f"{r['layout']:11} {r['load']:13} {r['lifecycles_per_s']:8.1f} {frees:>8} {r['decision_p50_ms']:8.2f} {r['decision_p90_ms']:8.2f} "
              f"{r['decision_p99_ms']:8.2f} {r['lifecycle_p99_ms']:9.2f} {cpu:>17} {r['generator_cpu_pct']:>4}/{r['nats_server_cpu_pct']:<5} "
              f"{r['open_bookings_after']:5} {r['loadavg_1m']:6.2f} {r['errors'] or ''}{' ' + r['metrics_scrape_error'] if r['metrics_scrape_error'] else ''}")
    scrape_failures = sum(1 for r in rows if r["metrics_scrape_error"])
    if scrape_failures:
        print(f"\n{scrape_failures} of {len(rows)} rows lost frees/s (a bridge's /metrics did not answer; frees/s '-')")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "metrics_scrape_failures": scrape_failures,
            "duration_s": args.duration, "rate": args.rate, "concurrency": args.concurrency, "workers": args.workers,
            "prefixes": args.prefixes, "block_size": BLOCK, "bridge_args": args.bridge_args,
            "modes": "FULL_DUPLEX_STREAMED request and response; body 1 chunk, response 2 chunks"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    png = plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
