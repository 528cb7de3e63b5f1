"""Routing quality on Mooncake traces: kv vs round_robin vs random through the real services.

Starts nats-server + indexer + scheduler + epp-bridge (as `kvr dev` does), replays the trace slice with
a fresh `kvr mock-workers` fleet per (policy, load), prints the comparison table, writes
bench/results/<name>.json and copies the plots to docs/img/<name>_*.png.

    .venv/bin/python bench/routing_quality.py --name routing_conversation \\
        --trace data/mooncake_conversation_trace.jsonl.gz --limit 4000 --speedup 10 \\
        --workers 8 --kv-blocks 32000 --rate-scale 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.dev import Stack, start_stack
from services.replay.__main__ import replay
from services.replay.report import markdown_table
from services.replay.settings import ReplayCommandConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--speedup", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=32000)
    p.add_argument("--rate-scale", default="1")
    p.add_argument("--compare", default="kv,round_robin,random")
    p.add_argument("--max-output-tokens", type=int, default=0)
    p.add_argument("--max-input-tokens", type=int, default=131072)
    args = p.parse_args()

    console = Console()
    run_dir = ROOT / ".kvr" / "bench" / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stack = Stack()
    try:
        start_stack(stack, run_dir, console, pool="bench")
        assert stack.nats is not None
        cfg = ReplayCommandConfig.build(
            nats_url=stack.nats.url,
            pool=["bench"],
            compare=args.compare.split(","),
            rate_scale=[float(x) for x in args.rate_scale.split(",")],
            start=args.start,
            limit=args.limit,
            speedup=args.speedup,
            workers=args.workers,
            block_size=args.block_size,
            kv_blocks=args.kv_blocks,
            max_output_tokens=args.max_output_tokens,
            max_input_tokens=args.max_input_tokens,
            fleet="spawn",
            out=str(run_dir / "report"),
            progress=sys.stdout.isatty(),
        )
        outcome = asyncio.run(replay(cfg, args.trace, console, log_dir=run_dir / "logs"))
    finally:
        stack.stop(console)
    table = markdown_table(outcome.summaries)
    print(table)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    doc = json.loads(outcome.paths["json"].read_text())
    doc["command"] = " ".join(sys.argv)
    (results / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for key, path in outcome.paths.items():  # ttft_cdf, and load (several load points) or policies (one)
        if path.suffix == ".png":
            shutil.copy(path, img / f"{args.name}_{key}.png")
    print(f"wrote {results / (args.name + '.json')} and docs/img/{args.name}_*.png; run dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
