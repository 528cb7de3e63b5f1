"""Settings of `kvr mock-workers` (env `KVR_<NAME>`); the common ones come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import COMMON, REGISTRY, Setting

SETTINGS = REGISTRY.register(
    "mock-workers",
    [
        Setting("count", 4, "number of simulated workers in this process", int),
        Setting("worker_id_base", 0, "first worker id (0 = derive from the clock so restarts get fresh ids)", int),
        Setting("block_size", 64, "KV block size in tokens", int),
        Setting("kv_blocks", 16384, "KV blocks per simulated worker", int),
        Setting("max_num_batched_tokens", 8192, "token budget of one forward pass", int),
        Setting("max_num_seqs", 256, "running sequences per worker", int),
        Setting("watermark", 0.01, "fraction of KV blocks kept free at admission", float),
        Setting("speedup", 1.0, "divide every simulated duration by this", float),
        Setting("model", "mock-model", "model name in the discovery record"),
        Setting("worker_ttl_s", 15.0, "discovery record TTL; re-put every ttl/3", float),
        Setting("load_interval_s", 1.0, "period of LoadReport messages (0 = off)", float),
        Setting("event_batch", 64, "max KV events per published message", int),
        Setting("fused_decode_steps", 64, "simulate up to this many pure-decode passes per wake-up (1 = step each pass)", int),
        Setting("max_inflight_acks", 256, "JetStream publishes awaiting an ack, per worker", int),
        Setting("openai_port", 0, "OpenAI HTTP API (/v1/completions, /v1/chat/completions): worker i on port+i; "
                "0 = a free port each; -1 = off (NATS generate only)", int),
        Setting("openai_host", "127.0.0.1", "address the OpenAI HTTP API binds and the discovery record carries"),
        Setting("tokenizer_dir", "", "tokenizer directory (tokenizer.json[.gz] + chat template) for text prompts on the "
                "HTTP API; empty = token ids only (nvext.token_data or prompt ids)"),
    ],
)

COMMAND_SETTINGS = SETTINGS
REGISTRY.command("mock-workers", (*COMMON, *COMMAND_SETTINGS))
