"""`kvr scheduler` / `python -m services.scheduler`."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from services.runtime.service import main_for

from .settings import SETTINGS


# The scheduler's index replica restores the indexer service's snapshots but writes none unless
# asked: serialising one pauses selection in ~10 ms pieces, and N replicas rewriting the same object
# every minute is load for nothing while the indexer Deployment keeps it fresh.
INDEX_REPLICA_DEFAULTS = {"snapshot_every_events": 0, "snapshot_interval_s": 0.0}


def _settings() -> tuple:
    """The scheduler's settings, plus the indexer's for its index replica (see INDEX_REPLICA_DEFAULTS)."""
    try:
        from services.indexer.settings import SETTINGS as INDEXER_SETTINGS
    except ImportError:
        return SETTINGS
    names = {s.name for s in SETTINGS}
    extra = (
        dataclasses.replace(s, default=INDEX_REPLICA_DEFAULTS[s.name]) if s.name in INDEX_REPLICA_DEFAULTS else s
        for s in INDEXER_SETTINGS
        if s.name not in names
    )
    return (*SETTINGS, *extra)


def make_app(cfg):  # type: ignore[no-untyped-def]
    from .app import SchedulerApp

    if cfg.embedded_indexer:
        from services.indexer.app import tune_gc

        tune_gc()
    return SchedulerApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("scheduler", "worker selection with replicated load (scheduler.select)", _settings(), make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
