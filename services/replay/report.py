"""Per-run summaries (latency, throughput, real hit rate, balance, errors) as JSON, markdown and PNGs."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import RunResult

# An online run's fleet that ends a pass later than this (simulated ms) behind its clock has added
# that delay to the latency of every request in flight on that worker: its latencies are flagged.
LAG_WARN_MS = 100.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarize(run: RunResult) -> dict[str, Any]:
    recs = run.records
    ok = [r for r in recs if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    per_worker_reqs: Counter[int] = Counter(r.worker_id for r in ok if r.worker_id is not None)
    per_worker_tokens: Counter[int] = Counter()
    for r in ok:
        if r.worker_id is not None:
            per_worker_tokens[r.worker_id] += r.prompt_tokens - (r.cached_tokens or 0)
    for wid in run.worker_ids:
        per_worker_reqs.setdefault(wid, 0)
        per_worker_tokens.setdefault(wid, 0)
    work = list(per_worker_tokens.values())
    span_ms = 0.0
    if ok:
        start = min(r.arrival_ms for r in recs)
        end = max(r.arrival_ms + (r.e2e_ms or 0.0) for r in ok)
        span_ms = max(end - start, 1e-9)
    errors = Counter(r.error for r in recs if r.error)
    return {
        "policy": run.policy,
        "rate_scale": run.rate_scale,
        "speedup": run.speedup,
        "requests": len(recs),
        "completed": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "ttft_ms": _stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "e2e_ms": _stats([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "route_wall_ms": _stats([r.route_ms for r in ok if r.route_ms is not None]),
        "worker_ttft_ms": _stats([r.worker_ttft_ms for r in ok if r.worker_ttft_ms is not None]),
        "throughput_req_s": len(ok) / (span_ms / 1000.0) if span_ms else 0.0,
        "output_tok_s": sum(r.output_tokens for r in ok) / (span_ms / 1000.0) if span_ms else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "preemptions": sum(r.preemptions for r in ok),
        "requests_per_worker": {str(k): v for k, v in sorted(per_worker_reqs.items())},
        "uncached_tokens_per_worker": {str(k): v for k, v in sorted(per_worker_tokens.items())},
        "balance_max_over_mean": (max(work) / statistics.fmean(work)) if work and statistics.fmean(work) else None,
        "balance_cv": (statistics.pstdev(work) / statistics.fmean(work)) if len(work) > 1 and statistics.fmean(work) else None,
        "open_bookings": None if run.open_bookings is None else len(run.open_bookings),
        "cleanup_failures": run.cleanup_failures,
        "fleet": run.fleet,
        "fleet_hit_rate": (run.fleet["cached_tokens"] / run.fleet["prompt_tokens"]) if run.fleet.get("prompt_tokens") else None,
        "fleet_lag_max_ms": run.fleet.get("lag_max_ms"),
        "fleet_lag_total_ms": run.fleet.get("lag_total_ms"),
        "fleet_late_passes": run.fleet.get("late_passes"),
        "wall_s": run.wall_s,
        "sim_span_s": span_ms / 1000.0,
    }


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def lag_warnings(summaries: Sequence[dict[str, Any]], threshold_ms: float = LAG_WARN_MS) -> list[str]:
    """One line per online run whose simulated fleet fell behind its clock by more than the threshold."""
    out = []
    for s in summaries:
        lag = s.get("fleet_lag_max_ms")
        if lag is not None and lag > threshold_ms:
            out.append(
                f"{s['policy']} (load ×{float(s['rate_scale']):g}): the fleet lagged its clock by up to {lag:,.0f} ms "
                f"({s.get('fleet_late_passes') or 0} late passes, {s.get('fleet_lag_total_ms') or 0:,.0f} ms in all)"
            )
    return out


LAG_ADVICE = (
    "The machine was too busy for this speed-up: a late engine pass adds its delay to every request in flight on "
    "that worker, so these latencies are inflated, unevenly between policies. Treat them as indicative; compare "
    "policies with `kvr replay --offline` (simulated time, exact), or rerun with a lower --speedup."
)


def compact_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The headline columns only (fits a terminal): policy, hit rate, TTFT, E2E, balance."""
    head = "| policy | done | hit rate | TTFT mean | TTFT p90 | E2E mean | balance max/mean |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for s in summaries:
        t, e = s["ttft_ms"], s["e2e_ms"]
        lines.append(
            f"| {s['policy']} | {s['completed']}/{s['requests']} | {100 * s['hit_rate']:.1f} % | {_fmt(t['mean'])} ms "
            f"| {_fmt(t['p90'])} ms | {_fmt(e['mean'])} ms | {_fmt(s['balance_max_over_mean'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_table(summaries: Sequence[dict[str, Any]], offline: bool = False) -> str:
    head = (
        "| policy | load × | done/req | errors | hit rate | TTFT mean | p50 | p90 | p99 | E2E mean | E2E p90 "
        "| req/s | out tok/s | balance max/mean | preempt | open bookings |"
    )
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for s in summaries:
        t, e = s["ttft_ms"], s["e2e_ms"]
        lines.append(
            "| "
            + " | ".join(
                [
                    s["policy"],
                    _fmt(float(s["rate_scale"]), 2),
                    f"{s['completed']}/{s['requests']}",
                    str(s["errors"]),
                    f"{100 * s['hit_rate']:.1f} %",
                    _fmt(t["mean"]),
                    _fmt(t["p50"]),
                    _fmt(t["p90"]),
                    _fmt(t["p99"]),
                    _fmt(e["mean"]),
                    _fmt(e["p90"]),
                    _fmt(s["throughput_req_s"], 2),
                    _fmt(s["output_tok_s"], 0),
                    _fmt(s["balance_max_over_mean"], 2),
                    str(s["preemptions"]),
                    _fmt(s["open_bookings"]),
                ]
            )
            + " |"
        )
    clock = "simulated time of the discrete-event simulator" if offline else "wall time × speed-up"
    return "\n".join(lines) + (
        f"\n\nLatencies in simulated milliseconds ({clock}); hit rate = cached prompt tokens / prompt tokens, "
        "from the workers' own accounting.\n"
    )


def plot(runs: Sequence[RunResult], summaries: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    # TTFT CDF per policy (highest load of each policy)
    by_policy: dict[str, RunResult] = {}
    for run in runs:
        if run.policy not in by_policy or run.rate_scale > by_policy[run.policy].rate_scale:
            by_policy[run.policy] = run
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, run in by_policy.items():
        xs = sorted(r.ttft_ms for r in run.records if r.ok and r.ttft_ms is not None)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step([x / 1000.0 for x in xs], ys, where="post", label=f"{policy} (load ×{run.rate_scale:g})")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (simulated s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = out_dir / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if len({s["rate_scale"] for s in summaries}) == 1:
        written.append(_policy_bars(plt, summaries, out_dir))
        return written

    # hit rate and TTFT vs load
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in dict.fromkeys(s["policy"] for s in summaries):
        pts = sorted((s["rate_scale"], s) for s in summaries if s["policy"] == policy)
        loads = [p for p, _ in pts]
        ax1.plot(loads, [100 * s["hit_rate"] for _, s in pts], marker="o", label=policy)
        ax2.plot(loads, [(s["ttft_ms"]["mean"] or float("nan")) / 1000.0 for _, s in pts], marker="o", label=policy)
    ax1.set_xlabel("load (arrival-rate multiplier)")
    ax1.set_ylabel("prefix-cache hit rate (%)")
    ax1.set_title("Hit rate vs load")
    ax2.set_xlabel("load (arrival-rate multiplier)")
    ax2.set_ylabel("mean TTFT (simulated s)")
    ax2.set_yscale("log")
    ax2.set_title("Mean TTFT vs load")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _policy_bars(plt: Any, summaries: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """One load point: bars per policy (hit rate; TTFT mean, p50, p90), not lines through one point."""
    policies = [s["policy"] for s in summaries]
    xs = range(len(policies))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    hit = [100 * s["hit_rate"] for s in summaries]
    bars = ax1.bar(xs, hit, color="tab:blue")
    ax1.bar_label(bars, labels=[f"{h:.1f} %" for h in hit])
    ax1.set_ylabel("prefix-cache hit rate (%)")
    ax1.set_title(f"Hit rate (load ×{float(summaries[0]['rate_scale']):g})")
    width = 0.27
    for i, (key, color) in enumerate((("mean", "tab:orange"), ("p50", "tab:green"), ("p90", "tab:red"))):
        vals = [(s["ttft_ms"][key] or 0.0) / 1000.0 for s in summaries]
        ax2.bar([x + (i - 1) * width for x in xs], vals, width, label=key, color=color)
    ax2.set_ylabel("TTFT (simulated s)")
    ax2.set_title("Time to first token")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), policies)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "policies.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: Sequence[RunResult], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r) for r in runs]
    doc: dict[str, Any] = {"meta": meta, "runs": summaries}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "records": out / "records.jsonl"}
    # per-request records, for analysis beyond the summary (one JSON object per line)
    with open(paths["records"], "w", encoding="utf-8") as fh:
        for r in runs:
            for rec in r.records:
                fh.write(json.dumps({"policy": r.policy, "rate_scale": r.rate_scale, **rec.__dict__}) + "\n")
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    header = "# Replay report\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
    offline = str(meta.get("mode", "")).startswith("offline")
    warnings = [] if offline else lag_warnings(summaries)
    note = ("\n**Indicative only:** " + "; ".join(warnings) + ". " + LAG_ADVICE + "\n") if warnings else ""
    paths["markdown"].write_text(header + markdown_table(summaries, offline) + note)
    for p in plot(runs, summaries, out):
        paths[p.stem] = p
    return paths
