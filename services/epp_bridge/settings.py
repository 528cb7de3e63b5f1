"""Settings of `kvr epp-bridge` (env `KVR_EPP_*`); the COMMON settings come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import COMMON, REGISTRY, Setting
from services.scheduler.settings import COMMAND_SETTINGS as SCHEDULER_SETTINGS

SETTINGS = REGISTRY.register(
    "epp-bridge",
    [
        Setting(
            "epp_tokenizer_dir",
            [],
            "local tokenizer directory per pool, `pool=/dir` or `/dir` for every pool (tokenizer.json + tokenizer_config.json); "
            "without one, requests must carry nvext.token_data or token-id prompts",
            is_list=True,
        ),
        Setting(
            "epp_chat_content_format",
            "string",
            "how list-of-parts message content reaches the chat template: `string` (text parts joined by newlines) or `openai` (parts as is)",
            choices=("string", "openai"),
        ),
        Setting("epp_max_body_bytes", 1_048_576, "largest epp.query payload accepted (bytes)", int),
        Setting("epp_max_prompt_tokens", 131_072, "largest prompt accepted (tokens)", int),
        Setting("epp_select_timeout_s", 1.0, "deadline for the scheduler's select reply; past it the query answers `timeout`", float),
        Setting("epp_cleanup_timeout_s", 2.0, "deadline for the scheduler's booking reply to epp.cleanup", float),
        Setting("epp_max_inflight", 512, "queries handled concurrently per pool", int),
        Setting(
            "epp_tokenize_threads",
            0,
            "threads that render chat templates and tokenize text prompts (the tokenizer releases the GIL); "
            "0 = inline on the event loop",
            int,
        ),
        Setting(
            "epp_label_filter",
            [],
            "worker-label filter per pool, `[pool:]key=value1|value2` (`key?=...`: workers without the label pass too); "
            "repeatable, all must pass; applies to epp.query and ext_proc",
            is_list=True,
        ),
        Setting("grpc_port", 0, "port of the Envoy ext_proc gRPC server (endpoint picker protocol) and its gRPC health service; 0 = off", int),
        Setting("grpc_host", "0.0.0.0", "address the ext_proc gRPC server binds"),
        Setting("grpc_pool", "", "pool the ext_proc server routes for (empty = the bridge's only pool)"),
        Setting("grpc_fallbacks", 2, "next-best endpoints after the chosen one in x-gateway-destination-endpoint (0-16)", int),
        Setting("grpc_tls_cert", "", "PEM certificate (chain) of the ext_proc server; with --grpc-tls-key turns TLS on"),
        Setting("grpc_tls_key", "", "PEM private key of the ext_proc server"),
        Setting("grpc_tls_client_ca", "", "PEM CA bundle: ext_proc clients must present a certificate it signed (mTLS); empty = no client certificates"),
        Setting(
            "grpc_drain_s",
            20.0,
            "on SIGTERM: seconds in-flight ext_proc streams may go on (health says NOT_SERVING at once); then they are "
            "cancelled and their bookings freed",
            float,
        ),
        Setting("grpc_max_streams", 4096, "ext_proc streams served at once; more get RESOURCE_EXHAUSTED", int),
        Setting(
            "grpc_max_decisions",
            128,
            "ext_proc requests being decided at once (parse, tokenize, select); more are answered 429 `overloaded` at once "
            "instead of queueing past the select deadline",
            int,
        ),
        Setting(
            "epp_embedded_scheduler",
            False,
            "one-process mode: run the scheduler, with its index replica, inside the bridge and call it "
            "directly (the scheduler's settings apply)",
            bool,
        ),
    ],
)

# What `kvr epp-bridge` parses besides COMMON: its own settings, plus the scheduler's (with its index
# replica's) for one-process mode, whose defaults are the scheduler's.
COMMAND_SETTINGS: tuple[Setting, ...] = (
    *SETTINGS,
    *(s for s in SCHEDULER_SETTINGS if s.name not in {x.name for x in SETTINGS}),
)
REGISTRY.command("epp-bridge", (*COMMON, *COMMAND_SETTINGS))
