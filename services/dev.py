"""`kvr dev` (what `make run` runs): the whole product on one machine, in under two minutes.

Starts an embedded nats-server, `kvr indexer`, `kvr scheduler` and `kvr epp-bridge` as child
processes, replays a short trace slice through them with a fresh simulated fleet per policy
(kv vs round_robin vs random), prints the comparison, then keeps a mock fleet serving until Ctrl-C.
Everything it writes (logs, nats store, report, plots) goes under one run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from services.runtime.config import HelpFormatter
from services.runtime.embedded import NatsServer
from services.runtime.procs import ServiceProcess

POOL = "dev"
REPO = Path(__file__).resolve().parent.parent
# The demo slice (lines 3000-3299 of the synthetic trace shipped in data/) has 36 % ideal prefix
# reuse; 300-request slices of the conversation trace have 6-11 %, too little to show anything.
# The checkout's data/ first, then ./data (the Docker image's working directory has a copy).
DEFAULT_TRACE = "mooncake_synthetic_trace.jsonl.gz"
TRACE_CANDIDATES = (REPO / "data" / DEFAULT_TRACE, Path("data") / DEFAULT_TRACE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvr dev", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--trace", default=os.environ.get("KVR_DEV_TRACE", ""),
                   help=f"Mooncake JSONL trace, plain or .gz [env KVR_DEV_TRACE; default: data/{DEFAULT_TRACE}, else a generated one]")
    p.add_argument("--start", type=int, default=3000, help="first trace line of the slice")
    p.add_argument("--limit", type=int, default=300, help="requests in the slice")
    p.add_argument("--speedup", type=float, default=10.0, help="simulation speed-up")
    p.add_argument("--workers", type=int, default=4, help="mock workers")
    p.add_argument("--kv-blocks", type=int, default=16384, help="KV blocks per worker (of 64 tokens)")
    p.add_argument("--max-output-tokens", type=int, default=32, help="output tokens cap per request")
    p.add_argument("--compare", default="kv,round_robin,random", help="policies to compare")
    p.add_argument("--run-dir", default="", help="where logs, store and report go (default: .kvr/dev/<time>)")
    p.add_argument("--no-serve", action="store_true", help="exit after the comparison instead of serving until Ctrl-C")
    return p


def pick_trace(arg: str, run_dir: Path, console: Console) -> tuple[str, int]:
    """(path, start line) — the shipped synthetic trace when available, else a generated workload."""
    if arg:
        return arg, -1
    for cand in TRACE_CANDIDATES:
        if cand.exists():
            # relative to the working directory when inside it, so printed commands can be pasted as is
            return os.path.relpath(cand) if cand.resolve().is_relative_to(Path.cwd()) else str(cand), -1
    from services.replay.trace import synthetic_trace, write_trace

    path = write_trace(synthetic_trace(400), run_dir / "generated_trace.jsonl")
    console.print(f"  no Mooncake trace found; generated a shared-prefix workload: {path}")
    return str(path), 0


class Stack:
    """Children started so far, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.nats: NatsServer | None = None
        self.procs: list[ServiceProcess] = []

    def stop(self, console: Console) -> None:
        for proc in reversed(self.procs):
            code = proc.terminate()
            console.print(f"  stopped kvr {proc.command} (exit {code})")
        self.procs.clear()
        if self.nats is not None:
            self.nats.stop()
            console.print("  stopped nats-server")
            self.nats = None


def start_stack(stack: Stack, run_dir: Path, console: Console, pool: str = POOL) -> None:
    """nats-server + indexer + scheduler + epp-bridge, each ready before returning (also used by bench/)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack.nats = NatsServer(store_dir=str(run_dir / "nats"), log_file=str(logs / "nats-server.log")).start()
    console.print(f"[green]✓[/] nats-server (JetStream) {stack.nats.url}  monitor http://127.0.0.1:{stack.nats.monitor_port}")
    for command, extra in (("indexer", []), ("scheduler", ["--seed", "1"]), ("epp-bridge", [])):
        proc = ServiceProcess(command, extra, nats_url=stack.nats.url, pools=[pool], log_path=str(logs / f"{command}.log"))
        stack.procs.append(proc.start())
    for proc in stack.procs:
        proc.wait_ready(60)
        console.print(f"[green]✓[/] kvr {proc.command:<10} ready  {proc.base_url}/metrics")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    run_dir = Path(args.run_dir or REPO / ".kvr" / "dev" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    stop_requested = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    # SIGINT explicitly too: a shell that starts us in the background sets it to "ignore".
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    try:
        console.rule("[bold]kvr dev[/] — KV-cache-aware router, simulated fleet")
        console.print(f"run directory: {run_dir}")
        trace, start = pick_trace(args.trace, run_dir, console)
        start_stack(stack, run_dir, console)
        console.print(f"  ({time.monotonic() - t0:.1f} s) replaying a slice, each policy on a fresh mock fleet …")

        from services.replay.__main__ import _CLIENT_COMMON, replay
        from services.replay.report import markdown_table
        from services.replay.settings import SETTINGS

        values = {s.name: (list(s.default) if isinstance(s.default, list) else s.default) for s in [*_CLIENT_COMMON, *SETTINGS]}
        values.update(
            nats_url=stack.nats.url,
            pool=[POOL],
            compare=[p.strip() for p in args.compare.split(",") if p.strip()],
            start=args.start if start < 0 else start,
            limit=args.limit,
            speedup=args.speedup,
            workers=args.workers,
            kv_blocks=args.kv_blocks,
            max_output_tokens=args.max_output_tokens,
            max_input_tokens=100_000,
            fleet="spawn",
            out=str(run_dir / "report"),
        )
        outcome = asyncio.run(replay(SimpleNamespace(**values), trace, console, log_dir=logs))
        console.print()
        console.print(markdown_table(outcome.summaries), markup=False, soft_wrap=True)
        console.print(f"report   {outcome.paths['markdown']}  ({outcome.paths['json'].name})")
        console.print(f"plots    {outcome.paths['ttft_cdf']}  {outcome.paths['load']}")
        console.print(f"logs     {logs}")
        console.print(f"done in {time.monotonic() - t0:.0f} s")
        if args.no_serve:
            return 0 if all(s["errors"] == 0 for s in outcome.summaries) else 1

        fleet = ServiceProcess(
            "mock-workers",
            ["--count", str(args.workers), "--kv-blocks", str(args.kv_blocks), "--speedup", "1"],
            nats_url=stack.nats.url,
            pools=[POOL],
            log_path=str(logs / "mock-workers.log"),
        )
        stack.procs.append(fleet.start())
        fleet.wait_ready(60)
        console.rule("serving")
        console.print(f"NATS      {stack.nats.url}   (pool '{POOL}')")
        for proc in stack.procs:
            console.print(f"{proc.command:<12} {proc.base_url}/metrics   /readyz")
        console.print(
            "try:  .venv/bin/kvr epp --help      or  "
            f".venv/bin/kvr replay {trace} --nats-url {stack.nats.url} --pool {POOL} --fleet external --limit 50"
        )
        console.print("Ctrl-C to stop.")
        while not stop_requested:
            time.sleep(0.5)
            for proc in stack.procs:
                if proc.proc is not None and proc.proc.poll() is not None:
                    console.print(f"[red]kvr {proc.command} exited with {proc.proc.returncode}; see {proc.log_path}[/]")
                    return 1
        return 0
    except KeyboardInterrupt:
        console.print("\nstopping …")
        return 0
    except Exception as exc:  # noqa: BLE001 - tell the newcomer where to look
        console.print(f"[red]kvr dev failed: {type(exc).__name__}: {exc}[/]\nlogs: {logs}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish stopping children even on a second Ctrl-C
        from services.replay.fleets import SpawnedFleet

        SpawnedFleet.terminate_all()
        stack.stop(console)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
