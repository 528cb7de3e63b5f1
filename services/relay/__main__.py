"""`kvr relay` / `python -m services.relay`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import main_for

from .settings import SETTINGS


def make_app(cfg):  # type: ignore[no-untyped-def]
    from .app import RelayApp

    return RelayApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("relay", "vLLM/SGLang ZMQ KV events → KVR_KV, with replay and discovery heartbeat", SETTINGS, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
