"""What the benchmarks measure besides latency: percentiles, a process's CPU time, the bridge's
per-phase means from its /metrics."""

from __future__ import annotations

import os
from pathlib import Path

from services.runtime.procs import Scrape


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), for the CPU share of each service."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) per phase of kvr_epp_phase_seconds, from the text of the bridge's /metrics."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        for suffix, idx in (("_sum", 0), ("_count", 1)):
            prefix = f"kvr_epp_phase_seconds{suffix}{{phase=\""
            if line.startswith(prefix):
                phase = line[len(prefix):].split('"', 1)[0]
                out.setdefault(phase, [0.0, 0.0])[idx] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def phase_means_us(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    means = {}
    for phase, (s1, c1) in after.items():
        s0, c0 = before.get(phase, (0.0, 0.0))
        if c1 > c0:
            means[phase] = round((s1 - s0) / (c1 - c0) * 1e6, 1)
    return means



def phase_means_between(before: Scrape, after: Scrape) -> tuple[dict[str, float] | None, str | None]:
    """The bridge's per-phase means between two scrapes of its /metrics; (None, why) when either
    failed: a bridge too loaded to answer in time costs this figure, not the run."""
    failed = next((s.error for s in (before, after) if s.error is not None), None)
    if failed is not None:
        return None, failed
    return phase_means_us(phase_totals(before.body), phase_totals(after.body)), None
