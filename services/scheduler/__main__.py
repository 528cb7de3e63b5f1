"""`kvr scheduler` / `python -m services.scheduler`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import ServiceApp, main_for

from .settings import SchedulerConfig


def make_app(cfg: SchedulerConfig) -> ServiceApp:
    from .app import SchedulerApp

    if cfg.embedded_indexer:
        from services.runtime.heap import tune_gc

        tune_gc()
    return SchedulerApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("scheduler", "worker selection with replicated load (scheduler.select)", SchedulerConfig, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
