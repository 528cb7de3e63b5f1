"""Settings of `kvr scheduler` (env `KVR_<NAME>`); the common ones come from `services.runtime.config`."""

from __future__ import annotations

from schemas.api import POLICY_NAMES, Policy
from services.indexer.settings import IndexerConfig
from services.runtime.config import REGISTRY, ServiceConfig, config, embed, setting


@config
class SchedulerConfig(ServiceConfig):
    router_id: str = setting("", "this replica's id in booking events (empty = random)")
    block_size: int = setting(16, "block size used when no live worker reports one")
    overlap_score_credit: float = setting(1.0, "credit per device-cached block in the cost rule")
    prefill_load_scale: float = setting(1.0, "weight of the prefill term in the cost rule")
    host_cache_hit_weight: float = setting(0.75, "credit per host-tier cached block")
    disk_cache_hit_weight: float = setting(0.25, "credit per disk-tier cached block")
    router_temperature: float = setting(0.0, "softmax temperature (0 = lowest cost wins)")
    cost_rule: str = setting(
        "kvr", "cost rule of the kv policy: kvr (ours) or dynamo (Dynamo's exact formula)", choices=("kvr", "dynamo")
    )
    selection_policy: str = setting(Policy.KV.value, "default policy", choices=POLICY_NAMES)
    pool_policy: tuple[str, ...] = setting((), "per-pool default policy, e.g. llama=round_robin (repeatable)")
    seed: int = setting(-1, "RNG seed for temperature sampling / random policy (-1 = from the OS)")
    active_decode_blocks_threshold: float | None = setting(
        0.9, "busy when active blocks / total_kv_blocks exceeds this (Dynamo's 0.9; off = none)"
    )
    active_prefill_tokens_threshold: float | None = setting(None, "busy when active prefill tokens exceed this (off)")
    active_prefill_tokens_threshold_frac: float | None = setting(
        None, "busy when active prefill tokens exceed this × max_num_batched_tokens (off)"
    )
    queue_max_size: int = setting(
        256,
        "admission queue: booking selects that may wait per pool on this replica when every eligible target is busy (0 = refuse at once)",
    )
    queue_timeout_s: float = setting(
        0.5, "admission queue: longest wait before `overloaded` (a select's queue_timeout_ms may shorten or lengthen it)"
    )
    queue_retry_after_s: float = setting(1.0, "retry hint (retry_after_s, HTTP Retry-After) sent with `overloaded`")
    load_report_max_age_s: float = setting(10.0, "worker load reports older than this are ignored for busy detection")
    booking_ttl_s: float = setting(300.0, "a booking without free expires after this many seconds")
    booking_unconfirmed_ttl_s: float = setting(
        60.0, "a booking without prefill_complete expires after this many seconds (0 = booking_ttl_s)"
    )
    bookings_feed: str = setting("push", "how KVR_BOOKINGS is consumed: push (lowest lag) or pull", choices=("push", "pull"))
    expiry_sweep_s: float = setting(1.0, "how often expired bookings are swept")
    max_request_tokens: int = setting(131072, "largest prompt (tokens) accepted by select")
    match_timeout_s: float = setting(1.0, "timeout of indexer.match requests")
    booking_sync_timeout_s: float = setting(1.0, "bounded wait for the bookings stream before answering")
    max_inflight: int = setting(64, "concurrent select handlers per pool")
    embedded_indexer: bool = setting(
        True,
        "fold KVR_KV into an index replica in this process (Dynamo's router layout); false: ask the indexer service over indexer.match",
    )
    no_kv_events: bool = setting(False, "approximate mode: workers publish no KV events, predict cache from decisions")
    approx_ttl_s: float = setting(120.0, "approximate mode: lifetime of a predicted cached block")
    approx_max_blocks: int = setting(1 << 20, "approximate mode: size cap of the predicted cache (blocks)")
    # The index replica's settings (the indexer's). It restores the indexer service's snapshots but
    # writes none unless asked: serialising one pauses selection in ~10 ms pieces, and N replicas
    # rewriting the same object every minute is load for nothing while the indexer Deployment keeps
    # it fresh.
    index: IndexerConfig = embed(IndexerConfig, snapshot_every_events=0, snapshot_interval_s=0.0)


SETTINGS = REGISTRY.register("scheduler", SchedulerConfig.own_settings())
REGISTRY.command("scheduler", SchedulerConfig.settings())
