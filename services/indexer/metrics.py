"""Prometheus metrics of the indexer. Per-event counts live in the pure index (`PrefixIndex.counters`)
and are exported by a collector at scrape time, so the hot path pays nothing for them."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.runtime import fastmetrics

MESSAGES = fastmetrics.Counter(
    "kvr_indexer_messages_total",
    "KVR_KV messages by outcome (ok; malformed, bad_subject, subject_mismatch: refused; held: worker not in discovery yet; "
    "removed_worker; skipped_covered: already in the restored snapshot; skipped_replayed: re-read for another worker)",
    ["pool", "outcome"],
)
DROPPED_EVENTS = Counter(
    "kvr_indexer_dropped_events_total", "Events not applied, by reason (removed_worker = discovery removed it)", ["pool", "reason"]
)
MATCH_SECONDS = fastmetrics.Histogram(
    "kvr_indexer_match_seconds",
    "In-process find_matches time (excludes NATS)",
    ["pool"],
    buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
)
APPLIED_SEQ = Gauge("kvr_indexer_applied_seq", "Last KVR_KV stream sequence applied")
STREAM_LAST_SEQ = Gauge("kvr_indexer_stream_last_seq", "Last sequence of KVR_KV at the latest poll")
CONSUMER_LAG = Gauge("kvr_indexer_consumer_lag", "Stream last sequence minus applied sequence (any subject)")
CONSUMER_PENDING = Gauge("kvr_indexer_consumer_pending", "Messages of the served pools not yet applied")
SNAPSHOT_SECONDS = Histogram(
    "kvr_indexer_snapshot_seconds",
    "Snapshot write time (serialise + upload)",
    ["pool"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SNAPSHOT_BYTES = Gauge("kvr_indexer_snapshot_bytes", "Size of the last snapshot written", ["pool"])
SNAPSHOTS = Counter("kvr_indexer_snapshots_total", "Snapshot writes by outcome", ["pool", "outcome"])
RESTORE_SECONDS = Gauge("kvr_indexer_restore_seconds", "Time to load the snapshot at start", ["pool"])
HISTORY_LOST = Counter(
    "kvr_indexer_history_lost_total",
    "KVR_KV dropped events this replica still needed: newer than its snapshot at start, or not read yet while it ran",
    ["pool"],
)

BACKFILLS = Counter(
    "kvr_indexer_backfills_total",
    "Workers whose early messages (published before their record appeared) had to be read again from the stream, by kind",
    ["pool", "kind"],
)


def init_pools(pools: list[str]) -> None:
    """Create the failure counters of each pool at 0, so an alert on their increase has a series to
    watch before the first failure (an absent series is not a zero)."""
    for pool in pools:
        SNAPSHOTS.labels(pool, "error")
        HISTORY_LOST.labels(pool)


# IndexerApp instances alive in this process (one normally; tests and embedding may create more).
APPS: weakref.WeakSet[Any] = weakref.WeakSet()


class IndexCollector(Collector):
    def collect(self) -> Iterator[Any]:
        events = CounterMetricFamily(
            "kvr_indexer_events", "KV events applied by type and outcome", labels=["pool", "event_type", "outcome"]
        )
        gaps = CounterMetricFamily("kvr_indexer_event_id_gaps", "Events applied after a forward jump of the event id", labels=["pool"])
        restarts = CounterMetricFamily(
            "kvr_indexer_publisher_restarts",
            "Publisher runs that started a (worker, dp_rank)'s event ids over (a new epoch, or a cleared going back)",
            labels=["pool"],
        )
        blocks = GaugeMetricFamily("kvr_indexer_blocks", "(block, worker) entries by storage tier", labels=["pool", "tier"])
        nodes = GaugeMetricFamily("kvr_indexer_nodes", "Radix tree nodes", labels=["pool"])
        workers = GaugeMetricFamily("kvr_indexer_workers", "(worker, dp_rank) pairs holding blocks", labels=["pool"])
        age = GaugeMetricFamily("kvr_indexer_snapshot_age_seconds", "Seconds since the last snapshot written or loaded", labels=["pool"])
        failing = GaugeMetricFamily(
            "kvr_indexer_snapshot_failures", "Consecutive failed snapshot writes (0 after a good one)", labels=["pool"]
        )
        unknown = CounterMetricFamily(
            "kvr_indexer_unknown_worker_messages",
            "Messages of workers not in discovery: held, evicted (buffer full), released (applied when the record appeared), "
            "discarded (worker deleted), rewinds/probes (re-read from the stream), forgotten_workers",
            labels=["pool", "outcome"],
        )
        held = GaugeMetricFamily("kvr_indexer_unknown_worker_buffer_bytes", "Bytes held for workers not in discovery", labels=["pool"])
        tracked = GaugeMetricFamily("kvr_indexer_unknown_workers", "Workers not in discovery with messages waiting", labels=["pool"])
        now = time.time()
        for app in list(APPS):
            for pool, st in app.pool_states().items():
                for (etype, outcome), n in st.index.counters.items():
                    events.add_metric([pool, etype, outcome], n)
                gaps.add_metric([pool], st.index.gaps)
                restarts.add_metric([pool], st.index.restarts)
                for tier, n in st.index.tier_blocks().items():
                    blocks.add_metric([pool, tier], n)
                nodes.add_metric([pool], st.index.nodes)
                workers.add_metric([pool], len(st.index.worker_keys()))
                if st.snapshot_time:
                    age.add_metric([pool], now - st.snapshot_time)
                failing.add_metric([pool], st.snapshot_failures)
                adm = app.admission.pools[pool]
                for outcome, n in adm.counts.items():
                    unknown.add_metric([pool, outcome], n)
                held.add_metric([pool], adm.held_bytes)
                tracked.add_metric([pool], len(adm.first_seq))
        yield from (events, gaps, restarts, blocks, nodes, workers, age, failing, unknown, held, tracked)


_COLLECTOR = IndexCollector()
REGISTRY.register(_COLLECTOR)
