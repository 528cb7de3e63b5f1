"""`kvr dev-gateway`: a development HTTP gateway that routes through an ext_proc endpoint picker."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import ServiceApp, main_for

from .settings import DevGatewayConfig


def make_app(cfg: DevGatewayConfig) -> ServiceApp:
    # imported lazily so `--help` stays fast
    from .app import DevGatewayApp

    return DevGatewayApp(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return main_for(
        "dev-gateway", "development OpenAI HTTP gateway: routes each request through an Envoy ext_proc endpoint picker "
        "(not a production gateway)", DevGatewayConfig, make_app, argv,
    )


if __name__ == "__main__":
    sys.exit(main())
