"""Settings of `kvr replay` (env `KVR_<NAME>`); the NATS connection, pool, subject_prefix come from COMMON."""

from __future__ import annotations

from schemas.api import POLICY_NAMES, Policy
from services.runtime.config import COMMON, NATS_CONNECTION, REGISTRY, Setting

SETTINGS = REGISTRY.register(
    "replay",
    [
        Setting("policy", Policy.KV.value, "routing policy of a single run", choices=POLICY_NAMES),
        Setting("compare", [], "policies to run back to back, each on a fresh fleet, e.g. kv,round_robin,random", is_list=True),
        Setting("rate_scale", [1.0], "arrival-rate multipliers (load points) to run for each policy", float, is_list=True),
        Setting("speedup", 10.0, "simulation speed-up: engine time and trace arrivals are both divided by it", float),
        Setting("start", 0, "first trace line to replay", int),
        Setting("limit", 0, "requests to replay (0 = all)", int),
        Setting("concurrency", 4096, "max requests in flight (a gateway's queue holds the rest)", int),
        Setting("max_output_tokens", 0, "cap on output tokens per request (0 = the trace's)", int),
        Setting("max_input_tokens", 131072, "skip trace requests with longer prompts", int),
        Setting("request_timeout_s", 300.0, "give up on a request after this many wall seconds", float),
        Setting("connect_timeout_s", 10.0, "online mode: give up when no NATS server answers within this many seconds", float),
        Setting("fleet", "spawn", "mock fleet per run: spawn (child process), inproc, external (already running)",
                choices=("spawn", "inproc", "external")),
        Setting("workers", 8, "mock workers per run (fleet spawn/inproc)", int),
        Setting("block_size", 64, "KV block size in tokens", int),
        Setting("kv_blocks", 16384, "KV blocks per mock worker", int),
        Setting("max_num_batched_tokens", 8192, "token budget of one forward pass", int),
        Setting("max_num_seqs", 256, "running sequences per worker", int),
        Setting("model", "mock-model", "model name sent in epp.query bodies"),
        Setting("salt", 0, "seed of the hash-id → tokens expansion", int),
        Setting("out", ".kvr/replay", "directory for report.json, report.md and the PNG plots"),
        Setting("progress", True, "show a progress bar", bool),
        Setting("offline", False, "offline discrete-event simulation: pure engines, index and selector in simulated time "
                "(no NATS, deterministic)", bool),
        Setting("offline_event_delay_ms", 20.0, "offline: simulated ms before a pass's KV events reach the index", float),
        Setting("offline_cleanup_delay_ms", 0.0, "offline: simulated ms before prefill_complete/free reach the router's load view",
                float),
        Setting("offline_booking_delay_ms", 0.0, "offline: simulated ms before a decision's own booking reaches the load view "
                "(selects within it do not see each other)", float),
        Setting("offline_seed", 0, "offline: RNG seed of the random policy and softmax sampling", int),
        Setting("offline_overrides", [], "offline: cost-rule overrides key=value (overlap_score_credit, prefill_load_scale, "
                "temperature, host_cache_hit_weight, disk_cache_hit_weight)", is_list=True),
        Setting("offline_fused_decode_steps", 256, "offline: max pure-decode passes committed at once", int),
    ],
)

# COMMON settings that make sense for a client tool: the NATS connection (URL, credentials, TLS) and a few more
CLIENT_COMMON = (*NATS_CONNECTION, *(s for s in COMMON if s.name in ("pool", "subject_prefix", "log_format", "log_level")))
REGISTRY.command("replay", (*CLIENT_COMMON, *SETTINGS))
