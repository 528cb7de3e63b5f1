"""`kvr` — one console entry point with a subcommand per service and tool."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# subcommand → (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "indexer": ("services.indexer.__main__", "prefix index over KVR_KV; answers indexer.match / indexer.dump"),
    "scheduler": ("services.scheduler.__main__", "worker selection with replicated load (scheduler.select)"),
    "epp-bridge": ("services.epp_bridge.__main__", "GAIE endpoint-picker bridge (epp.query / epp.cleanup)"),
    "epp": ("services.epp_bridge.client", "send epp.query / epp.cleanup requests (operator client)"),
    "relay": ("services.relay.__main__", "vLLM ZMQ KV events → KVR_KV, with discovery heartbeat"),
    "mock-workers": ("services.mock_worker.__main__", "simulated engine fleet publishing real KV events"),
    "replay": ("services.replay.__main__", "replay a Mooncake trace through the router and report"),
    "dev-gateway": ("services.dev_gateway.__main__", "development HTTP gateway routing through an ext_proc picker (not for production)"),
    "dev": ("services.dev", "embedded nats-server + all services + mock fleet + a short replay"),
    "provision": ("services.provision", "create or check the streams, buckets and object store, then exit"),
    "nats-config": ("services.runtime.nats_config", "print the NATS accounts, users and permissions of every kvr role"),
    "schemas": ("schemas.cli", "export / check the JSON Schema files of the wire messages"),
    "config-table": ("services.config_table", "print the configuration table (markdown)"),
}


# Commands that need the `kvr[sim]` extra (simulation, progress bars, plots); the router image has
# none of these packages, so they say so in one line instead of a traceback.
SIM_COMMANDS = frozenset({"replay", "dev"})
SIM_PACKAGES = ("numpy", "matplotlib", "rich")


def missing_sim_packages() -> list[str]:
    return [name for name in SIM_PACKAGES if importlib.util.find_spec(name) is None]


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: kvr <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `kvr <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"kvr: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in SIM_COMMANDS and (missing := missing_sim_packages()):
        print(
            f"kvr {name}: needs the simulation extra ({', '.join(missing)} not installed): pip install 'kvr[sim]'"
            " (the image: build the `sim` target)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
