"""Settings of `kvr mock-workers` (env `KVR_<NAME>`); the common ones come from services.runtime.config."""

from __future__ import annotations

from services.runtime.config import REGISTRY, ServiceConfig, config, setting


@config
class MockWorkersConfig(ServiceConfig):
    count: int = setting(4, "number of simulated workers in this process")
    worker_id_base: int = setting(0, "first worker id (0 = derive from the clock so restarts get fresh ids)")
    block_size: int = setting(64, "KV block size in tokens")
    kv_blocks: int = setting(16384, "KV blocks per simulated worker")
    max_num_batched_tokens: int = setting(8192, "token budget of one forward pass")
    max_num_seqs: int = setting(256, "running sequences per worker")
    watermark: float = setting(0.01, "fraction of KV blocks kept free at admission")
    speedup: float = setting(1.0, "divide every simulated duration by this")
    model: str = setting("mock-model", "model name in the discovery record")
    worker_ttl_s: float = setting(15.0, "discovery record TTL; re-put every ttl/3")
    load_interval_s: float = setting(1.0, "period of LoadReport messages (0 = off)")
    event_batch: int = setting(64, "max KV events per published message")
    fused_decode_steps: int = setting(64, "simulate up to this many pure-decode passes per wake-up (1 = step each pass)")
    max_inflight_acks: int = setting(256, "JetStream publishes awaiting an ack, per worker")
    openai_port: int = setting(0, "OpenAI HTTP API (/v1/completions, /v1/chat/completions): worker i on port+i; "
                               "0 = a free port each; -1 = off (NATS generate only)")
    openai_host: str = setting("127.0.0.1", "address the OpenAI HTTP API binds and the discovery record carries")
    tokenizer_dir: str = setting("", "tokenizer directory (tokenizer.json[.gz] + chat template) for text prompts on the "
                                 "HTTP API; empty = token ids only (nvext.token_data or prompt ids)")


SETTINGS = REGISTRY.register("mock-workers", MockWorkersConfig.own_settings())
REGISTRY.command("mock-workers", MockWorkersConfig.settings())
