"""Settings of `kvr scheduler` (env `KVR_<NAME>`); the common ones come from `services.runtime.config`."""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec

from schemas.api import POLICY_NAMES, Overrides, Policy
from services.indexer.settings import IndexerConfig
from services.runtime.config import REGISTRY, Config, ServiceConfig, config, embed, setting

from .cost import DYNAMO_COST, CostConfig
from .selector import BusyThresholds

# The cost weights (setting → the per-request `Overrides` field that may replace it, whose bounds it takes).
WEIGHT_OVERRIDES: dict[str, str] = {
    "overlap_score_credit": "overlap_score_credit",
    "prefill_load_scale": "prefill_load_scale",
    "host_cache_hit_weight": "host_cache_hit_weight",
    "disk_cache_hit_weight": "disk_cache_hit_weight",
    "router_temperature": "temperature",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@config
class RoutingConfig(Config):
    """How the kv policy decides: the cost rule, the busy thresholds and the admission queue.

    One declaration for the two places that run the decision: the scheduler service (and the
    bridge that embeds it) and the offline simulator (`kvr replay --offline`), so the simulator
    runs the service's rule under the same flags, defaults and bounds. Out-of-range values are
    refused when the config is built (ValueError; the commands turn it into a usage error)."""

    overlap_score_credit: float = setting(1.0, "credit per device-cached block in the cost rule")
    prefill_load_scale: float = setting(1.0, "weight of the prefill term in the cost rule")
    host_cache_hit_weight: float = setting(0.75, "credit per host-tier cached block")
    disk_cache_hit_weight: float = setting(0.25, "credit per disk-tier cached block")
    router_temperature: float = setting(0.0, "softmax temperature (0 = lowest cost wins)")
    cost_rule: str = setting(
        "kvr", "cost rule of the kv policy: kvr (ours) or dynamo (Dynamo's exact formula)", choices=("kvr", "dynamo")
    )
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

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, wire in WEIGHT_OVERRIDES.items():
            value = getattr(self, name)
            try:  # the bounds of a request's own override of the same weight
                msgspec.convert({wire: value}, Overrides)
            except msgspec.ValidationError as exc:
                raise ValueError(f"{_flag(name)} {value!r}: {str(exc).split(' - at ')[0]}") from None
        if self.cost_rule not in ("kvr", "dynamo"):
            raise ValueError(f"--cost-rule {self.cost_rule!r}: kvr or dynamo")
        for name in ("active_decode_blocks_threshold", "active_prefill_tokens_threshold", "active_prefill_tokens_threshold_frac"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_flag(name)} {value!r}: a finite number >= 0, or off")
        if self.queue_max_size < 0:
            raise ValueError(f"--queue-max-size {self.queue_max_size}: >= 0 (0 = refuse at once)")
        if not (math.isfinite(self.queue_timeout_s) and self.queue_timeout_s >= 0):
            raise ValueError(f"--queue-timeout-s {self.queue_timeout_s!r}: a finite number of seconds >= 0")

    def cost(self) -> CostConfig:
        """The cost rule these settings select (`--cost-rule`), with their weights."""
        return replace(
            DYNAMO_COST if self.cost_rule == "dynamo" else CostConfig(),
            overlap_score_credit=self.overlap_score_credit,
            prefill_load_scale=self.prefill_load_scale,
            host_cache_hit_weight=self.host_cache_hit_weight,
            disk_cache_hit_weight=self.disk_cache_hit_weight,
            temperature=self.router_temperature,
        )

    def busy(self) -> BusyThresholds:
        return BusyThresholds(
            active_decode_blocks=self.active_decode_blocks_threshold,
            active_prefill_tokens=self.active_prefill_tokens_threshold,
            active_prefill_tokens_frac=self.active_prefill_tokens_threshold_frac,
        )

    @property
    def queue_timeout_ms(self) -> int:
        """The admission queue's default deadline, in the ms of a select's `queue_timeout_ms`."""
        return int(self.queue_timeout_s * 1000)


@config
class SchedulerConfig(ServiceConfig):
    router_id: str = setting("", "this replica's id in booking events (empty = random)")
    block_size: int = setting(16, "block size used when no live worker reports one")
    selection_policy: str = setting(Policy.KV.value, "default policy", choices=POLICY_NAMES)
    pool_policy: tuple[str, ...] = setting((), "per-pool default policy, e.g. llama=round_robin (repeatable)")
    seed: int = setting(-1, "RNG seed for temperature sampling / random policy (-1 = from the OS)")
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
    # The decision's rule, busy thresholds and admission queue (shared with `kvr replay --offline`).
    routing: RoutingConfig = embed(RoutingConfig)
    # The index replica's settings (the indexer's). It restores the indexer service's snapshots but
    # writes none unless asked: serialising one pauses selection in ~10 ms pieces, and N replicas
    # rewriting the same object every minute is load for nothing while the indexer Deployment keeps
    # it fresh.
    index: IndexerConfig = embed(IndexerConfig, snapshot_every_events=0, snapshot_interval_s=0.0)


# The routing settings are the scheduler's (its ConfigMap lists them); `kvr replay` parses them too.
SETTINGS = REGISTRY.register("scheduler", (*SchedulerConfig.own_settings(), *RoutingConfig.own_settings()))
REGISTRY.command("scheduler", SchedulerConfig.settings())
