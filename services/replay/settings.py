"""Settings of `kvr replay` (env `KVR_<NAME>`); the NATS connection, pool, subject_prefix come from the common ones."""

from __future__ import annotations

from schemas.api import POLICY_NAMES, Policy
from services.runtime.config import REGISTRY, ClientConfig, config, embed, setting
from services.scheduler.settings import RoutingConfig


@config
class ReplayCommandConfig(ClientConfig):
    policy: str = setting(Policy.KV.value, "routing policy of a single run", choices=POLICY_NAMES)
    compare: tuple[str, ...] = setting((), "policies to run back to back, each on a fresh fleet, e.g. kv,round_robin,random")
    rate_scale: tuple[float, ...] = setting((1.0,), "arrival-rate multipliers (load points) to run for each policy")
    speedup: float = setting(10.0, "simulation speed-up: engine time and trace arrivals are both divided by it")
    start: int = setting(0, "first trace line to replay")
    limit: int = setting(0, "requests to replay (0 = all)")
    concurrency: int = setting(4096, "max requests in flight (a gateway's queue holds the rest)")
    max_output_tokens: int = setting(0, "cap on output tokens per request (0 = the trace's)")
    max_input_tokens: int = setting(131072, "skip trace requests with longer prompts")
    request_timeout_s: float = setting(300.0, "give up on a request after this many wall seconds")
    connect_timeout_s: float = setting(10.0, "online mode: give up when no NATS server answers within this many seconds")
    fleet: str = setting("spawn", "mock fleet per run: spawn (child process), inproc, external (already running)",
                         choices=("spawn", "inproc", "external"))
    workers: int = setting(8, "mock workers per run (fleet spawn/inproc)")
    block_size: int = setting(64, "KV block size in tokens")
    kv_blocks: int = setting(16384, "KV blocks per mock worker")
    max_num_batched_tokens: int = setting(8192, "token budget of one forward pass")
    max_num_seqs: int = setting(256, "running sequences per worker")
    model: str = setting("mock-model", "model name sent in epp.query bodies")
    salt: int = setting(0, "seed of the hash-id → tokens expansion")
    out: str = setting(".kvr/replay", "directory for report.json, report.md and the PNG plots")
    progress: bool = setting(True, "show a progress bar")
    offline: bool = setting(False, "offline discrete-event simulation: pure engines, index and selector in simulated time "
                            "(no NATS, deterministic)")
    offline_event_delay_ms: float = setting(20.0, "offline: simulated ms before a pass's KV events reach the index")
    offline_cleanup_delay_ms: float = setting(0.0, "offline: simulated ms before prefill_complete/free reach the router's load view")
    offline_booking_delay_ms: float = setting(0.0, "offline: simulated ms before a decision's own booking reaches the load view "
                                              "(selects within it do not see each other)")
    offline_seed: int = setting(0, "offline: RNG seed of the random policy and softmax sampling")
    offline_overrides: tuple[str, ...] = setting((), "offline: the cost rule's own fields over the one the scheduler's flags build, "
                                                 "key=value (decode_load_scale, credit_load_gain, clip_prefill, inflight_overlap; "
                                                 "rule=dynamo = --cost-rule dynamo)")
    offline_fused_decode_steps: int = setting(256, "offline: max pure-decode passes committed at once")
    # The scheduler's routing settings (cost rule, busy thresholds, admission queue), under its flag
    # names and defaults: the offline simulator decides as `kvr scheduler` with the same flags does.
    # Online, the running scheduler's own settings decide.
    routing: RoutingConfig = embed(RoutingConfig)


SETTINGS = REGISTRY.register("replay", ReplayCommandConfig.own_settings())
REGISTRY.command("replay", ReplayCommandConfig.settings())
