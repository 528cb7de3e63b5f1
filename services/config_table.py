"""Print the configuration table of every command (the README embeds this output)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from services.runtime.config import markdown_table

# Modules that declare settings with REGISTRY.register(...); importing them fills the registry.
SETTINGS_MODULES = (
    "services.indexer.settings",
    "services.scheduler.settings",
    "services.epp_bridge.settings",
    "services.relay.settings",
    "services.mock_worker.settings",
    "services.replay.settings",
    "services.provision",
    "services.dev_gateway.settings",
)


def load_all() -> None:
    for name in SETTINGS_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise


def render() -> str:
    load_all()
    return markdown_table()


def main(argv: Sequence[str] | None = None) -> int:
    print(render(), end="")
    return 0
