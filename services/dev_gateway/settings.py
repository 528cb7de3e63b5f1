"""Settings of `kvr dev-gateway` (env `KVR_<NAME>`); the common ones come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import COMMON, REGISTRY, Setting

SETTINGS = REGISTRY.register(
    "dev-gateway",
    [
        Setting("gateway_host", "127.0.0.1", "address the gateway's OpenAI HTTP port binds"),
        Setting("gateway_port", 8080, "the gateway's OpenAI HTTP port (0 = a free port)", int),
        Setting("extproc_target", "127.0.0.1:9002", "host:port of the endpoint picker's ext_proc gRPC server (plaintext)"),
        Setting("extproc_timeout_s", 10.0, "deadline of each ext_proc answer", float),
        Setting("upstream_connect_timeout_s", 2.0, "connect timeout to a chosen endpoint; then the next fallback is tried", float),
        Setting("upstream_timeout_s", 300.0, "a forwarded request gives up after this many seconds without bytes", float),
    ],
)

COMMAND_SETTINGS = SETTINGS
REGISTRY.command("dev-gateway", (*COMMON, *COMMAND_SETTINGS))
