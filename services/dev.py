"""`kvr dev` (what `make run` runs): the whole product on one machine, in well under a minute.

1. Starts an embedded nats-server, `kvr indexer`, `kvr scheduler` and `kvr epp-bridge` (with its
   Envoy ext_proc port and the shipped dev tokenizer) as child processes.
2. The headline: a trace slice replayed per policy (kv vs round_robin vs random) in the offline
   discrete-event simulator — the real engine, index and selector in simulated time, so the same
   seed gives the same table on any machine, however busy.
3. A short online run of the same slice through the real services (epp.query → mock worker →
   epp.cleanup) on a fresh wall-clock fleet per policy; when a fleet lags its clock (a busy machine)
   its numbers are flagged as indicative, with the lag.
4. Keeps serving until Ctrl-C: a mock fleet speaking OpenAI HTTP and the dev gateway in front of the
   bridge's ext_proc port, so `curl` reaches the router as a GAIE gateway's client would. The
   addresses go to an env file (`.kvr/dev/env`) that the README's commands source.
Everything else it writes (logs, nats store, reports, plots) goes under one run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from services.runtime.config import HelpFormatter
from services.runtime.embedded import NatsServer, free_port
from services.runtime.procs import ServiceProcess

if TYPE_CHECKING:
    from services.replay.settings import ReplayCommandConfig

POOL = "dev"
MODEL = "mock-model"

REPO = Path(__file__).resolve().parent.parent
# The demo slice (lines 3000-3299 of the synthetic trace shipped in data/) has 36 % ideal prefix
# reuse; 300-request slices of the conversation trace have 6-11 %, too little to show anything.
# The checkout's data/ first, then ./data (the Docker image's working directory has a copy).
DEFAULT_TRACE = "mooncake_synthetic_trace.jsonl.gz"
TRACE_CANDIDATES = (REPO / "data" / DEFAULT_TRACE, Path("data") / DEFAULT_TRACE)
TOKENIZER_CANDIDATES = (REPO / "data" / "tokenizer", Path("data") / "tokenizer")
DEFAULT_ENV_FILE = ".kvr/dev/env"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvr dev", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--trace", default=os.environ.get("KVR_DEV_TRACE", ""),
                   help=f"Mooncake JSONL trace, plain or .gz [env KVR_DEV_TRACE; default: data/{DEFAULT_TRACE}, else a generated one]")
    p.add_argument("--start", type=int, default=3000, help="first trace line of the slice")
    p.add_argument("--limit", type=int, default=300, help="requests in the slice (offline headline)")
    p.add_argument("--online-limit", type=int, default=150, help="requests of the slice replayed online (0 = skip the online run)")
    p.add_argument("--online-compare", default="kv,round_robin", help="policies of the online run")
    p.add_argument("--speedup", type=float, default=10.0, help="speed-up of the online run's simulated fleets")
    p.add_argument("--workers", type=int, default=4, help="mock workers (simulated and serving)")
    p.add_argument("--kv-blocks", type=int, default=16384, help="KV blocks per worker (of 64 tokens)")
    p.add_argument("--max-output-tokens", type=int, default=32, help="output tokens cap per replayed request")
    p.add_argument("--compare", default="kv,round_robin,random", help="policies of the offline headline")
    p.add_argument("--nats-port", type=int, default=4222, help="NATS port (taken → a free one; 0 = a free one)")
    p.add_argument("--gateway-port", type=int, default=8080, help="dev gateway's OpenAI HTTP port (taken → a free one; 0 = a free one)")
    p.add_argument("--extproc-port", type=int, default=9002, help="EPP bridge's ext_proc gRPC port (taken → a free one; 0 = a free one)")
    p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="where the serving addresses are written (shell syntax)")
    p.add_argument("--run-dir", default="", help="where logs, store and reports go (default: .kvr/dev/<time>)")
    p.add_argument("--no-serve", action="store_true", help="exit after the comparison instead of serving until Ctrl-C")
    return p


def pick_trace(arg: str, run_dir: Path, console: Console) -> tuple[str, int]:
    """(path, start line) — the shipped synthetic trace when available, else a generated workload."""
    if arg:
        return arg, -1
    for cand in TRACE_CANDIDATES:
        if cand.exists():
            return shown_path(cand), -1
    from services.replay.trace import synthetic_trace, write_trace

    path = write_trace(synthetic_trace(400), run_dir / "generated_trace.jsonl")
    console.print(f"  no Mooncake trace found; generated a shared-prefix workload: {path}")
    return str(path), 0


def shown_path(path: Path) -> str:
    """Relative to the working directory when inside it, so printed commands can be pasted as is."""
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


def tokenizer_dir() -> Path | None:
    return next((c.resolve() for c in TOKENIZER_CANDIDATES if (c / "tokenizer_config.json").is_file()), None)


def port_or_free(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there (well-known ports make the printed commands stable),
    else a free port."""
    if preferred > 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, preferred))
                return preferred
            except OSError:
                pass
    return free_port(host)


class Stack:
    """Children started so far, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.nats: NatsServer | None = None
        self.procs: list[ServiceProcess] = []
        self.grpc_port: int | None = None

    def stop(self, console: Console) -> None:
        for proc in reversed(self.procs):
            code = proc.terminate()
            console.print(f"  stopped kvr {proc.command} (exit {code})")
        self.procs.clear()
        if self.nats is not None:
            self.nats.stop()
            console.print("  stopped nats-server")
            self.nats = None


def launch_stack(stack: Stack, run_dir: Path, console: Console, pool: str = POOL, nats_port: int = 0,
                 grpc_port: int | None = None, tokenizer: Path | None = None) -> None:
    """nats-server (ready) + indexer, scheduler, epp-bridge started (not yet ready: `wait_stack`)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack.nats = NatsServer(store_dir=str(run_dir / "nats"), port=nats_port, log_file=str(logs / "nats-server.log")).start()
    console.print(f"[green]✓[/] nats-server (JetStream) {stack.nats.url}  monitor http://127.0.0.1:{stack.nats.monitor_port}")
    bridge: list[str] = []
    if grpc_port is not None:
        stack.grpc_port = grpc_port
        bridge += ["--grpc-port", str(grpc_port), "--grpc-host", "127.0.0.1"]
    if tokenizer is not None:
        bridge += ["--epp-tokenizer-dir", str(tokenizer)]
    for command, extra in (("indexer", []), ("scheduler", ["--seed", "1"]), ("epp-bridge", bridge)):
        proc = ServiceProcess(command, extra, nats_url=stack.nats.url, pools=[pool], log_path=str(logs / f"{command}.log"))
        stack.procs.append(proc.start())


def wait_stack(stack: Stack, console: Console) -> None:
    for proc in stack.procs:
        proc.wait_ready(60)
        console.print(f"[green]✓[/] kvr {proc.command:<10} ready  {proc.base_url}/metrics")


def start_stack(stack: Stack, run_dir: Path, console: Console, pool: str = POOL) -> None:
    """nats-server + indexer + scheduler + epp-bridge, each ready before returning (also used by bench/)."""
    launch_stack(stack, run_dir, console, pool)
    wait_stack(stack, console)


def replay_values(args: argparse.Namespace, trace_start: int, **overrides: Any) -> ReplayCommandConfig:
    """`kvr replay`'s settings at their defaults, with the demo's slice and fleet."""
    from services.replay.settings import ReplayCommandConfig

    demo = {
        "pool": [POOL],
        "start": args.start if trace_start < 0 else trace_start,
        "limit": args.limit,
        "workers": args.workers,
        "kv_blocks": args.kv_blocks,
        "max_output_tokens": args.max_output_tokens,
        "max_input_tokens": 100_000,
    }
    return ReplayCommandConfig.build({**demo, **overrides})


def policies(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def write_env_file(path: Path, values: dict[str, str], run_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# written by `kvr dev` (run directory {run_dir}); removed when it stops. Use: . {DEFAULT_ENV_FILE}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")


def curl_line(gateway: str) -> str:
    body = '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'
    return f"curl -si {gateway}/v1/chat/completions -H 'content-type: application/json' -d '{body}'"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    from services.runtime.logs import setup_logging

    setup_logging("console", "warning")  # the in-process replays' NATS client: only what needs attention
    run_dir = Path(args.run_dir or REPO / ".kvr" / "dev" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env_file = Path(args.env_file)
    env_written = False
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
        tok = tokenizer_dir()
        if tok is None:
            console.print("  [yellow]no data/tokenizer: chat and text prompts need token ids (nvext.token_data)[/]")
        grpc_port = port_or_free(args.extproc_port)
        launch_stack(stack, run_dir, console, nats_port=port_or_free(args.nats_port), grpc_port=grpc_port, tokenizer=tok)
        assert stack.nats is not None

        # 1. the headline, while the services start: deterministic, whatever the machine's load
        from services.replay.__main__ import print_lag_warnings, replay, replay_offline
        from services.replay.report import compact_table

        offline_cfg = replay_values(args, start, compare=policies(args.compare), offline=True, out=str(run_dir / "report-offline"))
        console.print(f"  ({time.monotonic() - t0:.1f} s) offline simulation of the slice, each policy on a fresh simulated fleet …")
        offline = replay_offline(offline_cfg, trace, console)
        wait_stack(stack, console)
        console.print()
        console.rule("[bold]headline[/] — offline simulator (simulated time: same seed, same table on any machine)")
        console.print(compact_table(offline.summaries), markup=False, soft_wrap=True)
        console.print(f"report   {offline.paths['markdown']}   plots {offline.paths['ttft_cdf'].parent}/*.png")

        # 2. the same slice through the real services, short; flagged when the fleet lagged its clock
        online_ok = True
        if args.online_limit > 0:
            console.print()
            console.print(f"  ({time.monotonic() - t0:.1f} s) online: the first {args.online_limit} requests through the running "
                          f"services at speed-up {args.speedup:g}, a fresh mock fleet per policy …")
            online_cfg = replay_values(
                args, start, nats_url=stack.nats.url, compare=policies(args.online_compare), limit=args.online_limit,
                speedup=args.speedup, fleet="spawn", out=str(run_dir / "report-online"),
            )
            online = asyncio.run(replay(online_cfg, trace, console, log_dir=logs))
            console.print()
            console.rule("online run through the real services (wall clock: indicative, varies with the machine's load)")
            console.print(compact_table(online.summaries), markup=False, soft_wrap=True)
            if not print_lag_warnings(console, online.summaries):
                console.print("  the fleets kept to their clocks (no pass later than "
                              "the lag threshold): the online latencies are not inflated by this machine's load")
            console.print(f"report   {online.paths['markdown']}")
            online_ok = all(s["errors"] == 0 for s in online.summaries)
        console.print(f"logs     {logs}")
        console.print(f"done in {time.monotonic() - t0:.0f} s")
        if args.no_serve:
            return 0 if online_ok and all(s["errors"] == 0 for s in offline.summaries) else 1

        # 3. serve: an OpenAI-speaking fleet at speed-up 1 and the dev gateway in front of ext_proc
        fleet_args = ["--count", str(args.workers), "--kv-blocks", str(args.kv_blocks), "--speedup", "1", "--openai-port", "0",
                      "--model", MODEL]
        if tok is not None:
            fleet_args += ["--tokenizer-dir", str(tok)]
        fleet = ServiceProcess("mock-workers", fleet_args, nats_url=stack.nats.url, pools=[POOL], log_path=str(logs / "mock-workers.log"))
        stack.procs.append(fleet.start())
        gateway_port = port_or_free(args.gateway_port)
        gateway = ServiceProcess(
            "dev-gateway", ["--gateway-port", str(gateway_port), "--extproc-target", f"127.0.0.1:{grpc_port}"],
            nats_url=stack.nats.url, pools=[POOL], log_path=str(logs / "dev-gateway.log"),
        )
        stack.procs.append(gateway.start())
        fleet.wait_ready(60)
        gateway.wait_ready(60)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        env = {"KVR_NATS_URL": stack.nats.url, "KVR_POOL": POOL, "KVR_DEV_GATEWAY": gateway_url,
               "KVR_DEV_EXTPROC": f"127.0.0.1:{grpc_port}"}
        write_env_file(env_file, env, run_dir)
        env_written = True
        console.rule("serving")
        console.print(f"OpenAI gateway  {gateway_url}   (dev gateway → ext_proc 127.0.0.1:{grpc_port} → "
                      f"{args.workers} mock workers, speed-up 1)")
        console.print(f"NATS            {stack.nats.url}   (pool '{POOL}')")
        for proc in stack.procs:
            console.print(f"{proc.command:<15} {proc.base_url}/metrics   /readyz")
        console.print("try it, in another terminal:")
        console.print(f"  {curl_line(gateway_url)}", markup=False, soft_wrap=True)
        console.print(f"  . {shown_path(env_file)}    # then every command of the README's quick start works as written",
                      markup=False)
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
        if env_written:
            env_file.unlink(missing_ok=True)
        from services.replay.fleets import SpawnedFleet

        SpawnedFleet.terminate_all()
        stack.stop(console)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
