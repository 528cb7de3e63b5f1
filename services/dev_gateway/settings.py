"""Settings of `kvr dev-gateway` (env `KVR_<NAME>`); the common ones come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import REGISTRY, ServiceConfig, config, setting


@config
class DevGatewayConfig(ServiceConfig):
    gateway_host: str = setting("127.0.0.1", "address the gateway's OpenAI HTTP port binds")
    gateway_port: int = setting(8080, "the gateway's OpenAI HTTP port (0 = a free port)")
    extproc_target: str = setting("127.0.0.1:9002", "host:port of the endpoint picker's ext_proc gRPC server (plaintext)")
    extproc_timeout_s: float = setting(10.0, "deadline of each ext_proc answer")
    upstream_connect_timeout_s: float = setting(2.0, "connect timeout to a chosen endpoint; then the next fallback is tried")
    upstream_timeout_s: float = setting(300.0, "a forwarded request gives up after this many seconds without bytes")


SETTINGS = REGISTRY.register("dev-gateway", DevGatewayConfig.own_settings())
REGISTRY.command("dev-gateway", DevGatewayConfig.settings())
