"""Settings of `kvr epp-bridge` (env `KVR_EPP_*`); the common settings come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import REGISTRY, ServiceConfig, config, embed, setting
from services.scheduler.settings import SchedulerConfig


@config
class EppBridgeConfig(ServiceConfig):
    epp_tokenizer_dir: tuple[str, ...] = setting(
        (),
        "local tokenizer directory per pool, `pool=/dir` or `/dir` for every pool (tokenizer.json + tokenizer_config.json); "
        "without one, requests must carry nvext.token_data or token-id prompts",
    )
    epp_chat_content_format: str = setting(
        "string",
        "how list-of-parts message content reaches the chat template: `string` (text parts joined by newlines) or `openai` (parts as is)",
        choices=("string", "openai"),
    )
    epp_max_body_bytes: int = setting(1_048_576, "largest epp.query payload accepted (bytes)")
    epp_max_prompt_tokens: int = setting(131_072, "largest prompt accepted (tokens)")
    epp_select_timeout_s: float = setting(1.0, "deadline for the scheduler's select reply; past it the query answers `timeout`")
    epp_cleanup_timeout_s: float = setting(2.0, "deadline for the scheduler's booking reply to epp.cleanup")
    epp_max_inflight: int = setting(512, "queries handled concurrently per pool")
    epp_tokenize_threads: int = setting(
        0,
        "threads that render chat templates and tokenize text prompts (the tokenizer releases the GIL); "
        "0 = inline on the event loop",
    )
    epp_label_filter: tuple[str, ...] = setting(
        (),
        "worker-label filter per pool, `[pool:]key=value1|value2` (`key?=...`: workers without the label pass too); "
        "repeatable, all must pass; applies to epp.query and ext_proc",
    )
    grpc_port: int = setting(0, "port of the Envoy ext_proc gRPC server (endpoint picker protocol) and its gRPC health service; 0 = off")
    grpc_host: str = setting("0.0.0.0", "address the ext_proc gRPC server binds")
    grpc_pool: str = setting("", "pool the ext_proc server routes for (empty = the bridge's only pool)")
    grpc_fallbacks: int = setting(2, "next-best endpoints after the chosen one in x-gateway-destination-endpoint (0-16)")
    grpc_tls_cert: str = setting("", "PEM certificate (chain) of the ext_proc server; with --grpc-tls-key turns TLS on")
    grpc_tls_key: str = setting("", "PEM private key of the ext_proc server", secret=True)
    grpc_tls_client_ca: str = setting(
        "", "PEM CA bundle: ext_proc clients must present a certificate it signed (mTLS); empty = no client certificates"
    )
    grpc_drain_s: float = setting(
        20.0,
        "on SIGTERM: seconds in-flight ext_proc streams may go on (health says NOT_SERVING at once); then they are "
        "cancelled and their bookings freed",
    )
    grpc_max_streams: int = setting(4096, "ext_proc streams served at once; more get RESOURCE_EXHAUSTED")
    grpc_max_decisions: int = setting(
        128,
        "ext_proc requests being decided at once (parse, tokenize, select); more are answered 429 `overloaded` at once "
        "instead of queueing past the select deadline",
    )
    epp_embedded_scheduler: bool = setting(
        False,
        "one-process mode: run the scheduler, with its index replica, inside the bridge and call it "
        "directly (the scheduler's settings apply)",
    )
    # One-process mode: the scheduler's settings (with its index replica's), at the scheduler's defaults.
    scheduler: SchedulerConfig = embed(SchedulerConfig)


SETTINGS = REGISTRY.register("epp-bridge", EppBridgeConfig.own_settings())
REGISTRY.command("epp-bridge", EppBridgeConfig.settings())
