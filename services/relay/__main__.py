"""`kvr relay` / `python -m services.relay`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import ServiceApp, main_for

from .settings import RelayConfig


def make_app(cfg: RelayConfig) -> ServiceApp:
    from schemas.codec import SchemaError

    from .app import RelayApp

    try:
        return RelayApp(cfg)
    except (ValueError, SchemaError) as exc:
        raise SystemExit(f"kvr relay: invalid configuration: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("relay", "vLLM/SGLang ZMQ KV events → KVR_KV, with replay and discovery heartbeat", RelayConfig, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
