"""`kvr replay TRACE`: replay a Mooncake trace through epp.query → mock worker → epp.cleanup, then report."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from schemas.api import POLICY_NAMES, Policy
from schemas.subjects import Names
from services.mock_worker.app import FleetConfig
from services.mock_worker.engine import EngineConfig
from services.runtime.config import add_settings, resolve
from services.runtime.logs import setup_logging
from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import NatsUnreachable, StreamSettings, connect, provision
from services.scheduler.settings import RoutingConfig

from .fleets import InProcessFleet, SpawnedFleet
from .offline import SERVICE_ROUTING, OfflineConfig, routing_of, run_offline
from .report import LAG_ADVICE, lag_warnings, markdown_table, summarize, write_report
from .runner import FleetHandle, ReplayConfig, RunResult, run_policy
from .settings import ReplayCommandConfig
from .trace import TraceError, TraceRequest, ideal_hit_rate, load_trace


@dataclass
class ReplayOutcome:
    runs: list[RunResult]
    summaries: list[dict[str, Any]]
    paths: dict[str, Path]
    skipped: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvr replay", description=__doc__)
    parser.add_argument("trace", help="Mooncake JSONL trace (timestamp, input_length, output_length, hash_ids)")
    add_settings(parser, ReplayCommandConfig.settings())
    return parser


def _advance(progress: Progress, task: TaskID) -> Callable[[int, int], None]:
    """A run's progress callback: completed requests move the bar."""
    return lambda done, _total: progress.update(task, completed=done)


def fleet_config(cfg: ReplayCommandConfig) -> FleetConfig:
    return FleetConfig(
        pool=cfg.pool[0],
        count=cfg.workers,
        engine=EngineConfig(
            block_size=cfg.block_size,
            kv_blocks=cfg.kv_blocks,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
        ),
        speedup=cfg.speedup,
        model=cfg.model,
        ttl_s=5.0,
        load_interval_s=1.0,
    )


def select_requests(cfg: ReplayCommandConfig, trace: str) -> tuple[list[TraceRequest], int]:
    reqs = load_trace(trace, start=cfg.start, limit=cfg.limit or None)
    kept = [r for r in reqs if r.input_length <= cfg.max_input_tokens]
    return kept, len(reqs) - len(kept)


async def replay(cfg: ReplayCommandConfig, trace: str, console: Console, log_dir: Path | None = None) -> ReplayOutcome:
    """Run every (policy, load) pair on a fresh fleet; write the report. Used by `kvr dev` too."""
    names = Names(prefix=cfg.subject_prefix)  # the other stream and bucket names at their defaults
    pool = cfg.pool[0]
    requests, skipped = select_requests(cfg, trace)
    policies = [Policy(p) for p in cfg.compare or (cfg.policy,)]
    nc = await connect(cfg.nats_url, "kvr-replay", auth=NatsAuth.from_cfg(cfg), max_wait_s=cfg.connect_timeout_s)
    runs: list[RunResult] = []
    try:
        await provision(nc.jetstream(), names, StreamSettings())
        fcfg = fleet_config(cfg)
        fleet_text = (
            "the fleet already serving the pool (its speed-up must be this one)"
            if cfg.fleet == "external"
            else f"fleet {cfg.fleet} ({cfg.workers} workers × {cfg.kv_blocks} blocks of {cfg.block_size} tokens)"
        )
        console.print(
            f"[bold]replay[/] {Path(trace).name}: {len(requests)} requests"
            f"{f' ({skipped} longer than {cfg.max_input_tokens} tokens skipped)' if skipped else ''}, "
            f"policies {', '.join(policies)}, load × {', '.join(f'{x:g}' for x in cfg.rate_scale)}, speed-up {cfg.speedup:g}, "
            + fleet_text
        )
        console.print(f"  ideal hit rate of this slice (infinite shared cache): {100 * ideal_hit_rate(requests):.1f} %")
        if cfg.routing != SERVICE_ROUTING:
            console.print("  [yellow]note:[/] the routing settings (cost rule and weights, busy thresholds, admission queue) "
                          "apply to --offline runs; online, the running scheduler's own settings decide")
        for rate in cfg.rate_scale:
            for policy in policies:
                fleet: FleetHandle | None
                if cfg.fleet == "inproc":
                    fleet = InProcessFleet(nc, names, fcfg)
                elif cfg.fleet == "spawn":
                    log_path = str(log_dir / f"mock-workers-{policy}-{rate:g}.log") if log_dir else None
                    fleet = SpawnedFleet(cfg.nats_url, fcfg, log_path, names.prefix)
                else:
                    fleet = None
                rcfg = ReplayConfig(
                    pool=pool,
                    policy=policy,
                    speedup=cfg.speedup,
                    rate_scale=rate,
                    concurrency=cfg.concurrency,
                    max_output_tokens=cfg.max_output_tokens or None,
                    request_timeout_s=cfg.request_timeout_s,
                    model=cfg.model,
                    salt=cfg.salt,
                )
                with Progress(
                    TextColumn(f"  {policy:<12} load ×{rate:<4g}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                    disable=not cfg.progress,
                    transient=False,
                ) as progress:
                    task = progress.add_task("replay", total=len(requests))
                    result = await run_policy(
                        nc, names, requests, rcfg, fleet, on_progress=_advance(progress, task)
                    )
                s = summarize(result)
                lag = "" if s["fleet_lag_max_ms"] is None else f", fleet max lag {s['fleet_lag_max_ms']:,.0f} ms"
                console.print(
                    f"    hit rate {100 * s['hit_rate']:.1f} %, TTFT mean {s['ttft_ms']['mean'] or 0:,.0f} ms, "
                    f"errors {s['errors']}, open bookings {s['open_bookings']}, wall {result.wall_s:.1f} s{lag}"
                )
                runs.append(result)
    finally:
        await nc.close()
    meta = {
        "trace": str(trace),
        "requests": len(requests),
        "skipped_too_long": skipped,
        "start": cfg.start,
        "speedup": cfg.speedup,
        "workers": cfg.workers,
        "block_size": cfg.block_size,
        "kv_blocks_per_worker": cfg.kv_blocks,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_output_tokens": cfg.max_output_tokens or "trace",
        "ideal_hit_rate": round(ideal_hit_rate(requests), 4),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    paths = write_report(runs, cfg.out, meta)
    return ReplayOutcome(runs, [summarize(r) for r in runs], paths, skipped)


def replay_offline(cfg: ReplayCommandConfig, trace: str, console: Console) -> ReplayOutcome:
    """`--offline`: every (policy, load) pair in the discrete-event simulator; same report."""
    requests, skipped = select_requests(cfg, trace)
    policies = [Policy(p) for p in cfg.compare or (cfg.policy,)]
    # The scheduler's routing flags, built as the service builds them; --offline-overrides over the rule.
    routing = routing_of(cfg.routing, cfg.offline_overrides)
    engine = EngineConfig(
        block_size=cfg.block_size,
        kv_blocks=cfg.kv_blocks,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_num_seqs=cfg.max_num_seqs,
    )
    console.print(
        f"[bold]offline replay[/] {Path(trace).name}: {len(requests)} requests"
        f"{f' ({skipped} longer than {cfg.max_input_tokens} tokens skipped)' if skipped else ''}, "
        f"policies {', '.join(policies)}, load × {', '.join(f'{x:g}' for x in cfg.rate_scale)}, "
        f"{cfg.workers} workers × {cfg.kv_blocks} blocks of {cfg.block_size} tokens, event delay {cfg.offline_event_delay_ms:g} ms"
    )
    console.print(f"  cost rule {cfg.routing.cost_rule}, {busy_text(cfg.routing)}")
    console.print(f"  ideal hit rate of this slice (infinite shared cache): {100 * ideal_hit_rate(requests):.1f} %")
    runs: list[RunResult] = []
    for rate in cfg.rate_scale:
        for policy in policies:
            ocfg = OfflineConfig(
                policy=policy, rate_scale=rate, workers=cfg.workers, engine=engine, event_delay_ms=cfg.offline_event_delay_ms,
                cleanup_delay_ms=cfg.offline_cleanup_delay_ms, booking_delay_ms=cfg.offline_booking_delay_ms, seed=cfg.offline_seed,
                max_output_tokens=cfg.max_output_tokens or None, fused_decode_steps=cfg.offline_fused_decode_steps, salt=cfg.salt,
                **routing,
            )
            with Progress(
                TextColumn(f"  {policy:<12} load ×{rate:<4g}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, disable=not cfg.progress, transient=False,
            ) as progress:
                task = progress.add_task("replay", total=len(requests))
                result = run_offline(requests, ocfg, on_progress=_advance(progress, task))
            s = summarize(result)
            console.print(
                f"    hit rate {100 * s['hit_rate']:.1f} %, TTFT mean {s['ttft_ms']['mean'] or 0:,.0f} ms, "
                f"errors {s['errors']}, open bookings {s['open_bookings']}, wall {result.wall_s:.1f} s"
            )
            runs.append(result)
    meta = {
        "mode": "offline (discrete-event, simulated time)",
        "trace": str(trace),
        "requests": len(requests),
        "skipped_too_long": skipped,
        "start": cfg.start,
        "workers": cfg.workers,
        "block_size": cfg.block_size,
        "kv_blocks_per_worker": cfg.kv_blocks,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs,
        "max_output_tokens": cfg.max_output_tokens or "trace",
        "event_delay_ms": cfg.offline_event_delay_ms,
        "cleanup_delay_ms": cfg.offline_cleanup_delay_ms,
        "booking_delay_ms": cfg.offline_booking_delay_ms,
        "seed": cfg.offline_seed,
        "cost": vars(routing["cost"]),
        "busy": vars(routing["busy"]),
        "queue_max_size": routing["queue_max_size"],
        "queue_timeout_ms": routing["queue_timeout_ms"],
        "ideal_hit_rate": round(ideal_hit_rate(requests), 4),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    paths = write_report(runs, cfg.out, meta)
    return ReplayOutcome(runs, [summarize(r) for r in runs], paths, skipped)


def busy_text(routing: RoutingConfig) -> str:
    """The busy thresholds and the admission queue, in a line."""
    limits = [
        f"{label} > {value:g}"
        for label, value in (
            ("active blocks / KV blocks", routing.active_decode_blocks_threshold),
            ("active prefill tokens", routing.active_prefill_tokens_threshold),
            ("active prefill tokens / batch budget", routing.active_prefill_tokens_threshold_frac),
        )
        if value is not None
    ]
    if not limits:
        return "no busy thresholds (the admission queue stays empty)"
    return f"busy when {' or '.join(limits)}, admission queue {routing.queue_max_size} for {routing.queue_timeout_s:g} s"


def print_lag_warnings(console: Console, summaries: Sequence[dict[str, Any]]) -> bool:
    """Say so, with the figures, when an online fleet fell behind its clock; True when it did."""
    warnings = lag_warnings(summaries)
    if warnings:
        console.print("[bold yellow]⚠ indicative numbers:[/] " + "; ".join(warnings) + ".")
        console.print(f"  {LAG_ADVICE}", markup=False)
    return bool(warnings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args, ReplayCommandConfig)
    except ValueError as exc:  # a routing setting out of its range, refused as `kvr scheduler` refuses it
        parser.error(str(exc))
    bad = [p for p in cfg.compare if p not in POLICY_NAMES]
    if bad:
        parser.error(f"--compare: unknown policies {bad}; choose from {', '.join(POLICY_NAMES)}")
    if cfg.speedup <= 0 or any(x <= 0 for x in cfg.rate_scale) or cfg.concurrency < 1:
        parser.error("--speedup and --rate-scale must be > 0, --concurrency >= 1")
    if cfg.offline:
        delays = (cfg.offline_event_delay_ms, cfg.offline_cleanup_delay_ms, cfg.offline_booking_delay_ms)
        if min(delays) < 0 or cfg.offline_fused_decode_steps < 1:
            parser.error("--offline-*-delay-ms must be >= 0, --offline-fused-decode-steps >= 1")
        try:
            routing_of(cfg.routing, cfg.offline_overrides)
        except ValueError as exc:
            parser.error(f"--offline-overrides: {exc}")
    setup_logging(cfg.log_format if cfg.log_format != "auto" else "console", "warning" if cfg.log_level == "info" else cfg.log_level)
    console = Console()
    try:
        outcome = replay_offline(cfg, args.trace, console) if cfg.offline else asyncio.run(replay(cfg, args.trace, console))
    except (TraceError, FileNotFoundError, NatsUnreachable) as exc:
        print(f"kvr replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    console.print()
    console.print(markdown_table(outcome.summaries, offline=cfg.offline), markup=False)
    if not cfg.offline:
        print_lag_warnings(console, outcome.summaries)
    plots = ", ".join(str(p) for p in outcome.paths.values() if p.suffix == ".png")
    console.print(f"report: {outcome.paths['markdown']}  json: {outcome.paths['json']}  plots: {plots}")
    failed = any(s["completed"] < s["requests"] for s in outcome.summaries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
