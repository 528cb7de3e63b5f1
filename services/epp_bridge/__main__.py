"""`kvr epp-bridge` / `python -m services.epp_bridge`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.runtime.service import main_for

from .app import make_app
from .settings import SETTINGS


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("epp-bridge", "GAIE endpoint-picker bridge: epp.query / epp.cleanup over NATS", SETTINGS, make_app, argv)


if __name__ == "__main__":
    sys.exit(main())
