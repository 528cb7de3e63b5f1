"""Routing quality in the offline discrete-event simulator (`kvr replay --offline`), as a benchmark.

    .venv/bin/python bench/routing_offline.py --name offline_conversation TRACE [kvr replay flags...]

Runs `replay_offline` with the given `kvr replay` flags (``--offline`` implied), prints the table,
writes `bench/results/<name>.json` (the report: meta + one summary per run) and copies the plots to
`docs/img/<name>_ttft_cdf.png` and `docs/img/<name>_load.png` (several load points) or
`docs/img/<name>_policies.png` (one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from services.replay.__main__ import build_parser, replay_offline
from services.replay.report import markdown_table
from services.replay.settings import ReplayCommandConfig
from services.runtime.config import resolve

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--name", required=True)
    ns, rest = pre.parse_known_args(argv)
    parser = build_parser()
    args = parser.parse_args([*rest, "--offline", "true"])
    out = Path(tempfile.mkdtemp(prefix=f"kvr-{ns.name}-"))
    cfg = resolve(args, ReplayCommandConfig).with_values(out=str(out))
    console = Console()
    outcome = replay_offline(cfg, args.trace, console)
    print(markdown_table(outcome.summaries, offline=True))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    doc = json.loads((out / "report.json").read_text())
    (results / f"{ns.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for png in sorted(out.glob("*.png")):  # ttft_cdf, and load or policies
        shutil.copy(png, img / f"{ns.name}_{png.stem}.png")
    print(f"wrote {results / f'{ns.name}.json'} and docs/img/{ns.name}_*.png (report dir {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
