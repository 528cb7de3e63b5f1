"""Plots of the epp.query benchmark (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# p99 targets of issue #5, by mode (ms)
P99_TARGET_MS = {"separate": 10.0, "separate-embedded-index": 10.0, "one-process": 5.0}


def plot_open_loop(rows: list[dict], targets: dict[str, float], path: Path) -> Path | None:
    """p50 / p90 / p99 of every open-loop run at a mode's target rate, one panel per mode and variant,
    with the p99 target as a dashed line: the run-to-run spread is the point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["load"] == f"open {targets[r['mode']]:.0f}/s":
            groups.setdefault((r["mode"], r["variant"]), []).append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ((mode, variant), runs) in zip(axes[0], groups.items(), strict=True):
        x = range(1, len(runs) + 1)
        for key, marker in (("p99_ms", "o"), ("p90_ms", "s"), ("p50_ms", "^")):
            ax.plot(x, [r[key] for r in runs], marker=marker, linestyle="none", label=key.split("_")[0])
        if mode in P99_TARGET_MS:
            ax.axhline(P99_TARGET_MS[mode], color="red", linestyle="--", linewidth=1, label="p99 target")
        ax.set_title(f"{mode} · {variant}\nopen {targets[mode]:.0f}/s", fontsize=9)
        ax.set_xlabel("run")
        ax.set_ylabel("latency (ms)")
        ax.set_xticks(list(x))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `path` and release it (pyplot keeps every open figure)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
