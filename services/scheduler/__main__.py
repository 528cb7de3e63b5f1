"""`kvr scheduler` / `python -m services.scheduler`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import main_for

from .settings import COMMAND_SETTINGS


def _settings() -> tuple:
    """The scheduler's settings, plus the indexer's for its index replica (see INDEX_REPLICA_DEFAULTS)."""
    return COMMAND_SETTINGS


def make_app(cfg):  # type: ignore[no-untyped-def]
    from .app import SchedulerApp

    if cfg.embedded_indexer:
        from services.runtime.heap import tune_gc

        tune_gc()
    return SchedulerApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("scheduler", "worker selection with replicated load (scheduler.select)", _settings(), make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
