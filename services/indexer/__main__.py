"""`kvr indexer` / `python -m services.indexer`: the prefix index service."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.heap import tune_gc
from services.runtime.service import main_for

from .app import make_app
from .settings import IndexerConfig


def main(argv: Sequence[str] | None = None) -> int:
    tune_gc()
    return main_for("indexer", "Prefix index over KVR_KV; answers indexer.match / indexer.dump", IndexerConfig, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
