"""Settings of `kvr scheduler` (env `KVR_<NAME>`); the common ones come from `services.runtime.config`."""

from __future__ import annotations

import dataclasses

from schemas.api import POLICY_NAMES, Policy
from services.indexer.settings import SETTINGS as INDEXER_SETTINGS
from services.runtime.config import COMMON, REGISTRY, Setting


def _opt_float(raw: str) -> float | None:
    raw = str(raw).strip().lower()
    if raw in ("", "none", "off"):
        return None
    return float(raw)


SETTINGS = REGISTRY.register(
    "scheduler",
    [
        Setting("router_id", "", "this replica's id in booking events (empty = random)"),
        Setting("block_size", 16, "block size used when no live worker reports one", int),
        Setting("overlap_score_credit", 1.0, "credit per device-cached block in the cost rule", float),
        Setting("prefill_load_scale", 1.0, "weight of the prefill term in the cost rule", float),
        Setting("host_cache_hit_weight", 0.75, "credit per host-tier cached block", float),
        Setting("disk_cache_hit_weight", 0.25, "credit per disk-tier cached block", float),
        Setting("router_temperature", 0.0, "softmax temperature (0 = lowest cost wins)", float),
        Setting("selection_policy", Policy.KV.value, "default policy", choices=POLICY_NAMES),
        Setting("pool_policy", [], "per-pool default policy, e.g. llama=round_robin (repeatable)", is_list=True),
        Setting("seed", -1, "RNG seed for temperature sampling / random policy (-1 = from the OS)", int),
        Setting("active_decode_blocks_threshold", 0.9,
                "busy when active blocks / total_kv_blocks exceeds this (Dynamo's 0.9; off = none)", _opt_float),
        Setting("active_prefill_tokens_threshold", None, "busy when active prefill tokens exceed this (off)", _opt_float),
        Setting(
            "active_prefill_tokens_threshold_frac",
            None,
            "busy when active prefill tokens exceed this × max_num_batched_tokens (off)",
            _opt_float,
        ),
        Setting("queue_max_size", 256,
                "admission queue: booking selects that may wait per pool on this replica when every eligible target is busy (0 = refuse at once)", int),
        Setting("queue_timeout_s", 0.5, "admission queue: longest wait before `overloaded` (a select's queue_timeout_ms may shorten or lengthen it)", float),
        Setting("queue_retry_after_s", 1.0, "retry hint (retry_after_s, HTTP Retry-After) sent with `overloaded`", float),
        Setting("load_report_max_age_s", 10.0, "worker load reports older than this are ignored for busy detection", float),
        Setting("booking_ttl_s", 300.0, "a booking without free expires after this many seconds", float),
        Setting("booking_unconfirmed_ttl_s", 60.0,
                "a booking without prefill_complete expires after this many seconds (0 = booking_ttl_s)", float),
        Setting("bookings_feed", "push", "how KVR_BOOKINGS is consumed: push (lowest lag) or pull", choices=("push", "pull")),
        Setting("expiry_sweep_s", 1.0, "how often expired bookings are swept", float),
        Setting("max_request_tokens", 131072, "largest prompt (tokens) accepted by select", int),
        Setting("match_timeout_s", 1.0, "timeout of indexer.match requests", float),
        Setting("booking_sync_timeout_s", 1.0, "bounded wait for the bookings stream before answering", float),
        Setting("max_inflight", 64, "concurrent select handlers per pool", int),
        Setting(
            "embedded_indexer",
            True,
            "fold KVR_KV into an index replica in this process (Dynamo's router layout); false: ask the indexer service over indexer.match",
            bool,
        ),
        Setting("no_kv_events", False, "approximate mode: workers publish no KV events, predict cache from decisions", bool),
        Setting("approx_ttl_s", 120.0, "approximate mode: lifetime of a predicted cached block", float),
        Setting("approx_max_blocks", 1 << 20, "approximate mode: size cap of the predicted cache (blocks)", int),
    ],
)

# The scheduler's index replica restores the indexer service's snapshots but writes none unless
# asked: serialising one pauses selection in ~10 ms pieces, and N replicas rewriting the same object
# every minute is load for nothing while the indexer Deployment keeps it fresh.
INDEX_REPLICA_DEFAULTS = {"snapshot_every_events": 0, "snapshot_interval_s": 0.0}

# What `kvr scheduler` parses besides COMMON: its own settings, plus the indexer's for its index
# replica (with INDEX_REPLICA_DEFAULTS).
COMMAND_SETTINGS: tuple[Setting, ...] = (
    *SETTINGS,
    *(
        dataclasses.replace(s, default=INDEX_REPLICA_DEFAULTS[s.name]) if s.name in INDEX_REPLICA_DEFAULTS else s
        for s in INDEXER_SETTINGS
        if s.name not in {x.name for x in SETTINGS}
    ),
)
REGISTRY.command("scheduler", (*COMMON, *COMMAND_SETTINGS))
