"""`kv` against the routers an operator could deploy instead, in the offline simulator.

    .venv/bin/python bench/peers.py                       # the recorded comparison (both traces)
    .venv/bin/python bench/peers.py --limit 200 --out .kvr/peers-quick   # a quick slice (minutes)

Every contender runs through the same `Decider` (services/scheduler/decide.py), the same simulated
engines and index (`services/replay/offline.py`), on the Mooncake conversation and synthetic traces
of `data/`, at every load point (arrival-rate multiplier). Contenders:

- ours: `kv` with its default settings (`CostConfig()`), and its variants (each change of the
  default rule alone, to show its effect; not competitors);
- Dynamo: `dynamo` (the exact Dynamo cost rule: overlap credit 1, prefill scale 1, temperature 0)
  and `dynamo_busy` (the same with busy threshold 0.9 on active decode blocks);
- peers (`services/scheduler/peers/`): `sglang_cache_aware`, `gaie_default`, `llmd_precise`;
- baselines: `round_robin`, `random`, `least_loaded`.

Writes, in `--out` (default `bench/results/peers/`): `peers.json` (deterministic: no wall-clock
figures), `<trace>_ttft.png` (mean and p99 TTFT vs load), `<trace>_hit.png` (hit rate vs load), and
prints the tables (also in `peers.md`) with, per load point, best peer's mean TTFT / ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.plots import save_figure
from schemas.api import Policy
from services.mock_worker.engine import EngineConfig
from services.replay.offline import OfflineConfig, run_offline
from services.replay.report import summarize
from services.replay.trace import TraceRequest, ideal_hit_rate, load_trace
from services.scheduler.cost import DYNAMO_COST, CostConfig
from services.scheduler.selector import BusyThresholds

ROOT = Path(__file__).resolve().parent.parent
TRACES = {
    "conversation": ROOT / "data" / "mooncake_conversation_trace.jsonl.gz",
    "synthetic": ROOT / "data" / "mooncake_synthetic_trace.jsonl.gz",
}
# Loads from the trace's own rate until every contender saturates (checked in the report).
LOADS = {"conversation": [1.0, 4.0, 8.0, 10.0, 12.0, 16.0], "synthetic": [1.0, 3.0, 6.0, 8.0, 10.0, 12.0]}
MAX_INPUT_TOKENS = 131_072


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours", "variant" (of ours, not a competitor), "dynamo", "peer", "baseline"
    policy: Policy = Policy.KV
    peer: str | None = None
    cost: CostConfig = field(default_factory=CostConfig)
    busy: BusyThresholds = field(default_factory=BusyThresholds)

    @property
    def competitor(self) -> bool:
        return self.kind in ("dynamo", "peer", "baseline")


CONTENDERS: tuple[Contender, ...] = (
    Contender("kv", "ours"),
    Contender("dynamo", "dynamo", cost=DYNAMO_COST),
    Contender("dynamo_busy", "dynamo", cost=DYNAMO_COST, busy=BusyThresholds(active_decode_blocks=0.9)),
    Contender("sglang_cache_aware", "peer", peer="sglang_cache_aware"),
    Contender("gaie_default", "peer", peer="gaie_default"),
    Contender("llmd_precise", "peer", peer="llmd_precise"),
    Contender("round_robin", "baseline", policy=Policy.ROUND_ROBIN),
    Contender("random", "baseline", policy=Policy.RANDOM),
    Contender("least_loaded", "baseline", policy=Policy.LEAST_LOADED),
)
BY_NAME = {c.name: c for c in CONTENDERS}


def variants() -> tuple[Contender, ...]:
    """Each change of our default rule alone, over Dynamo's rule (services/scheduler/cost.py)."""
    from services.scheduler.cost import VARIANTS

    return tuple(Contender(f"kv[{name}]", "variant", cost=cost) for name, cost in VARIANTS.items())


@dataclass(frozen=True)
class Job:
    trace: str
    load: float
    contender: Contender
    start: int
    limit: int
    workers: int
    kv_blocks: int
    block_size: int


_REQUESTS: dict[tuple[str, int, int], list[TraceRequest]] = {}


def requests_of(trace: str, start: int, limit: int) -> list[TraceRequest]:
    key = (trace, start, limit)
    if key not in _REQUESTS:
        reqs = load_trace(TRACES[trace], start=start, limit=limit or None)
        _REQUESTS[key] = [r for r in reqs if r.input_length <= MAX_INPUT_TOKENS]
    return _REQUESTS[key]


# Wall-clock and CPU figures vary from run to run: kept out of the JSON so that it is deterministic.
_VOLATILE = ("wall_s", "route_wall_ms")
_VOLATILE_FLEET = ("route_cpu_s", "engine_cpu_s")


def run_job(job: Job) -> tuple[Job, dict[str, Any], float]:
    t0 = time.perf_counter()
    c = job.contender
    cfg = OfflineConfig(
        policy=c.policy, rate_scale=job.load, workers=job.workers, cost=c.cost, busy=c.busy, peer=c.peer, label=c.name,
        engine=EngineConfig(block_size=job.block_size, kv_blocks=job.kv_blocks),
    )
    s = summarize(run_offline(requests_of(job.trace, job.start, job.limit), cfg))
    for k in _VOLATILE:
        s.pop(k, None)
    fleet = dict(s.pop("fleet"))
    for k in _VOLATILE_FLEET:
        fleet.pop(k, None)
    s["busy_max_over_mean"] = fleet.get("busy_max_over_mean")
    s["kind"] = c.kind
    return job, s, time.perf_counter() - t0


# --- the report ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def verdicts(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per load point: ours against the best competitor (Dynamo, peers, baselines)."""
    out = []
    for load in sorted({r["rate_scale"] for r in runs}):
        at = [r for r in runs if r["rate_scale"] == load]
        ours = next((r for r in at if r["kind"] == "ours"), None)
        rivals = [r for r in at if r["kind"] in ("dynamo", "peer", "baseline") and r["completed"]]
        if ours is None or not rivals:
            continue
        best_mean = min(rivals, key=lambda r: r["ttft_ms"]["mean"])
        best_p99 = min(rivals, key=lambda r: r["ttft_ms"]["p99"])
        best_peer = min((r for r in rivals if r["kind"] == "peer"), key=lambda r: r["ttft_ms"]["mean"], default=None)
        best_hit = max(r["hit_rate"] for r in at if r["completed"])
        m, p = ours["ttft_ms"]["mean"], ours["ttft_ms"]["p99"]
        out.append({
            "rate_scale": load,
            "ours_mean_ms": m, "ours_p99_ms": p, "ours_hit_rate": ours["hit_rate"], "ours_errors": ours["errors"],
            "best_rival_mean": best_mean["policy"], "best_rival_mean_ms": best_mean["ttft_ms"]["mean"],
            "best_rival_p99": best_p99["policy"], "best_rival_p99_ms": best_p99["ttft_ms"]["p99"],
            "best_peer": best_peer["policy"] if best_peer else None,
            "best_peer_mean_over_ours": (best_peer["ttft_ms"]["mean"] / m) if best_peer and m else None,
            "best_rival_mean_over_ours": best_mean["ttft_ms"]["mean"] / m if m else None,
            "best_rival_p99_over_ours": best_p99["ttft_ms"]["p99"] / p if p else None,
            "hit_rate_over_best": ours["hit_rate"] / best_hit if best_hit else None,
            "wins": bool(m <= best_mean["ttft_ms"]["mean"] and p <= best_p99["ttft_ms"]["p99"]
                         and best_hit and ours["hit_rate"] >= 0.95 * best_hit and not ours["errors"]),
        })
    return out


def table(trace: str, runs: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"#### {trace}",
        "",
        "| contender | load | done/req | err | hit rate | TTFT mean | p50 | p99 | E2E mean | req/s | balance | busy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["rate_scale"], r["order"])):
        t, e = r["ttft_ms"], r["e2e_ms"]
        bal, busy = r["balance_max_over_mean"], r["busy_max_over_mean"]
        lines.append(
            f"| {r['policy']} | ×{r['rate_scale']:g} | {r['completed']:,}/{r['requests']:,} | {r['errors']} | "
            f"{100 * r['hit_rate']:.1f} % | {_ms(t['mean'])} | {_ms(t['p50'])} | {_ms(t['p99'])} | {_ms(e['mean'])} | "
            f"{r['throughput_req_s']:.2f} | {'–' if bal is None else f'{bal:.2f}'} | {'–' if busy is None else f'{busy:.2f}'} |"
        )
    lines += [
        "",
        "| load | ours mean / p99 | best rival mean (who) | best rival p99 (who) | best peer mean / ours | "
        "best rival mean / ours | best rival p99 / ours | hit rate / best | goal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in verdicts(runs):
        peer_ratio = "–" if v["best_peer_mean_over_ours"] is None else f"{v['best_peer_mean_over_ours']:.2f} ({v['best_peer']})"
        lines.append(
            f"| ×{v['rate_scale']:g} | {_ms(v['ours_mean_ms'])} / {_ms(v['ours_p99_ms'])} | "
            f"{_ms(v['best_rival_mean_ms'])} ({v['best_rival_mean']}) | {_ms(v['best_rival_p99_ms'])} ({v['best_rival_p99']}) | "
            f"{peer_ratio} | {v['best_rival_mean_over_ours']:.2f} | {v['best_rival_p99_over_ours']:.2f} | "
            f"{100 * v['hit_rate_over_best']:.1f} % | {'met' if v['wins'] else '**not met**'} |"
        )
    return "\n".join(lines) + "\n"


def plots(trace: str, runs: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["policy"] for r in sorted(runs, key=lambda r: r["order"])))
    style = {"ours": ("-", 2.6), "variant": (":", 1.2), "dynamo": ("--", 1.6), "peer": ("-.", 1.6), "baseline": (":", 1.6)}

    def series(name: str, get: Any) -> tuple[list[float], list[float]]:
        pts = sorted((r["rate_scale"], get(r)) for r in runs if r["policy"] == name)
        return [p for p, _ in pts], [v for _, v in pts]

    written = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        kind = next(r["kind"] for r in runs if r["policy"] == name)
        ls, lw = style.get(kind, ("-", 1.2))
        x, y = series(name, lambda r: (r["ttft_ms"]["mean"] or float("nan")) / 1000.0)
        ax1.plot(x, y, ls, lw=lw, marker="o", ms=3, label=name)
        x, y = series(name, lambda r: (r["ttft_ms"]["p99"] or float("nan")) / 1000.0)
        ax2.plot(x, y, ls, lw=lw, marker="o", ms=3, label=name)
    for ax, what in ((ax1, "mean"), (ax2, "p99")):
        ax.set_yscale("log")
        ax.set_xlabel("load (arrival-rate multiplier)")
        ax.set_ylabel(f"{what} TTFT (simulated s, log)")
        ax.set_title(f"{trace}: {what} TTFT vs load")
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    written.append(save_figure(fig, out / f"{trace}_ttft.png"))

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name in names:
        kind = next(r["kind"] for r in runs if r["policy"] == name)
        ls, lw = style.get(kind, ("-", 1.2))
        x, y = series(name, lambda r: 100 * r["hit_rate"])
        ax.plot(x, y, ls, lw=lw, marker="o", ms=3, label=name)
    ax.set_xlabel("load (arrival-rate multiplier)")
    ax.set_ylabel("prefix-cache hit rate (%)")
    ax.set_title(f"{trace}: hit rate vs load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / f"{trace}_hit.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="conversation,synthetic", help="comma list of: " + ", ".join(TRACES))
    ap.add_argument(
        "--loads",
        default="",
        help="comma list of load multipliers for every trace (default: per trace, "
        + "; ".join(f"{t} {','.join(f'{x:g}' for x in v)}" for t, v in LOADS.items())
        + ")",
    )
    ap.add_argument("--contenders", default="", help="comma list (default: all): " + ", ".join(BY_NAME))
    ap.add_argument("--no-variants", action="store_true", help="leave out the variants of our rule")
    ap.add_argument("--start", type=int, default=0, help="first trace line")
    ap.add_argument("--limit", type=int, default=0, help="requests per trace (0 = the whole trace)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--kv-blocks", type=int, default=32_000)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers"))
    args = ap.parse_args(argv)

    traces = [t for t in args.traces.split(",") if t]
    unknown = [t for t in traces if t not in TRACES]
    if unknown:
        ap.error(f"unknown traces {unknown}")
    chosen = [BY_NAME[n] for n in args.contenders.split(",") if n] if args.contenders else list(CONTENDERS)
    if not args.no_variants:
        chosen += list(variants())
    order = {c.name: i for i, c in enumerate(chosen)}
    loads = {t: [float(x) for x in args.loads.split(",")] if args.loads else LOADS[t] for t in traces}
    # Lower loads of both traces first: a run cut short still has whole load points to show.
    jobs = [
        Job(t, loads[t][i], c, args.start, args.limit, args.workers, args.kv_blocks, args.block_size)
        for i in range(max(len(v) for v in loads.values()))
        for t in traces
        if i < len(loads[t])
        for c in chosen
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "fleet": {"workers": args.workers, "kv_blocks": args.kv_blocks, "block_size": args.block_size,
                  "max_num_batched_tokens": EngineConfig().max_num_batched_tokens, "max_num_seqs": EngineConfig().max_num_seqs},
        "event_delay_ms": OfflineConfig().event_delay_ms, "metrics_interval_ms": OfflineConfig().metrics_interval_ms,
        "start": args.start, "limit": args.limit, "traces": {},
    }
    for t in traces:
        reqs = requests_of(t, args.start, args.limit)
        meta["traces"][t] = {"file": TRACES[t].name, "requests": len(reqs), "ideal_hit_rate": round(ideal_hit_rate(reqs), 4)}
        print(f"{t}: {len(reqs)} requests, ideal hit rate {100 * ideal_hit_rate(reqs):.1f} %", flush=True)
    print(f"{len(jobs)} runs ({len(chosen)} contenders), {args.jobs} at a time", flush=True)

    results: dict[str, list[dict[str, Any]]] = {t: [] for t in traces}
    t_start = time.perf_counter()

    def record(job: Job, s: dict[str, Any], wall: float, done: int) -> None:
        s["order"] = order[job.contender.name]
        results[job.trace].append(s)
        partial = {"meta": meta, "traces": {t: {"runs": r} for t, r in results.items()}}
        (out / "peers.partial.json").write_text(json.dumps(partial, sort_keys=True, default=str) + "\n")
        print(
            f"[{done}/{len(jobs)} {time.perf_counter() - t_start:6.0f} s] {job.trace:<12} ×{job.load:<4g} "
            f"{job.contender.name:<22} hit {100 * s['hit_rate']:5.1f} %  TTFT mean {s['ttft_ms']['mean'] or 0:9,.0f}  "
            f"p99 {s['ttft_ms']['p99'] or 0:9,.0f} ms  errors {s['errors']}  ({wall:.0f} s)",
            flush=True,
        )

    if args.jobs <= 1:
        for i, job in enumerate(jobs, 1):
            record(*run_job(job), i)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_job, j) for j in jobs]
            for i, fut in enumerate(as_completed(futures), 1):
                record(*fut.result(), i)

    doc: dict[str, Any] = {"meta": meta, "traces": {}}
    md = []
    for t in traces:
        runs = sorted(results[t], key=lambda r: (r["rate_scale"], r["order"]))
        doc["traces"][t] = {"runs": runs, "verdicts": verdicts(runs)}
        md.append(table(t, runs))
        plots(t, runs, out)
    (out / "peers.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    (out / "peers.partial.json").unlink(missing_ok=True)
    (out / "peers.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}/peers.json, peers.md, " + ", ".join(f"{t}_ttft.png, {t}_hit.png" for t in traces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
