"""`kvr mock-workers`: a simulated engine fleet that registers, serves generate and publishes KV events."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import ServiceApp, main_for

from .settings import MockWorkersConfig


def make_app(cfg: MockWorkersConfig) -> ServiceApp:
    # imported lazily so `--help` stays fast
    from .app import MockFleetApp

    return MockFleetApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("mock-workers", "simulated engine fleet publishing real KV events", MockWorkersConfig, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
