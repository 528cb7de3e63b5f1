"""Prometheus metrics of the scheduler (`kvr_scheduler_*`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.runtime import fastmetrics

_FAST = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

DECISIONS = fastmetrics.Counter("kvr_scheduler_decisions_total", "select requests by outcome", ["pool", "policy", "outcome"])
KV_HIT_RATE = fastmetrics.Histogram(
    "kvr_scheduler_kv_hit_ratio",
    "overlap blocks of the chosen target / request blocks",
    ["pool"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
PHASE_SECONDS = fastmetrics.Histogram(
    "kvr_scheduler_phase_seconds", "selection latency by phase (hashing, match, scoring, booking)", ["phase"], buckets=_FAST
)
ACTIVE_BLOCKS = Gauge("kvr_scheduler_active_blocks", "active (decode) blocks per target", ["pool", "worker_id", "dp_rank"])
ACTIVE_PREFILL_TOKENS = Gauge(
    "kvr_scheduler_active_prefill_tokens", "prefill tokens not yet completed per target", ["pool", "worker_id", "dp_rank"]
)
ACTIVE_REQUESTS = Gauge("kvr_scheduler_active_requests", "booked requests per target", ["pool", "worker_id", "dp_rank"])
BOOKING_LAG = fastmetrics.Histogram(
    "kvr_scheduler_booking_lag_seconds",
    "booking event ts_ms → applied on this replica",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)
BOOKINGS_APPLIED = fastmetrics.Counter("kvr_scheduler_bookings_applied_total", "booking events applied, by type and effect", ["type", "effect"])
BOOKINGS_INVALID = Counter("kvr_scheduler_bookings_invalid_total", "booking events that failed to decode")
BOOKINGS_EXPIRED = Counter("kvr_scheduler_bookings_expired_total", "booking legs dropped by TTL expiry")
BOOKINGS_DROPPED_WORKER = Counter("kvr_scheduler_bookings_worker_removed_total", "booking legs dropped because their worker left")
WORKERS = Gauge("kvr_scheduler_workers", "live workers known", ["pool", "role"])
PREDICTED_BLOCKS = Gauge("kvr_scheduler_predicted_blocks", "approximate mode: predicted cached blocks")
LOAD_REPORTS_INVALID = Counter("kvr_scheduler_load_reports_invalid_total", "worker load reports that failed to decode")
BOOKINGS_REFUSED = Counter(
    "kvr_scheduler_bookings_refused_total", "booking events the full bookings stream refused (the request got `overloaded`)"
)
BOOKING_UPDATES_BEHIND = Counter(
    "kvr_scheduler_booking_updates_behind_total",
    "scheduler.booking requests answered `timeout` because this replica could not apply the bookings stream up to now in time",
)
BOOKINGS_UNRECORDED = Counter(
    "kvr_scheduler_bookings_unrecorded_total",
    "booking events the bookings stream did not acknowledge (no leader, ack timeout; the request got `timeout`)",
)

# --- admission queue -------------------------------------------------------------------------
QUEUE_DEPTH = Gauge("kvr_scheduler_queue_depth", "booking selects waiting in this replica's admission queue", ["pool"])
QUEUE_WAIT = fastmetrics.Histogram(
    "kvr_scheduler_queue_wait_seconds",
    "time a booking select waited in the admission queue, by outcome (admitted, timeout, evicted, full)",
    ["pool", "outcome"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
