"""`kvr schemas export|check` — keep `schemas/json/*.json` in step with the msgspec types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .export import JSON_DIR, export, stale_files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvr schemas", description=__doc__)
    parser.add_argument("action", choices=["export", "check"])
    args = parser.parse_args(argv)
    if args.action == "export":
        for path in export():
            print(path)
        return 0
    stale = stale_files()
    if stale:
        print(f"stale JSON schemas in {JSON_DIR}: {', '.join(stale)}; run `kvr schemas export`", file=sys.stderr)
        return 1
    print("JSON schemas are current")
    return 0
