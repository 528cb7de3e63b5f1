"""Prometheus metrics of `kvr relay` (names prefixed `kvr_relay_`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

ZMQ_BATCHES = Counter("kvr_relay_zmq_batches_total", "engine batches received (live and replayed)", ["dp_rank", "source"])
INVALID = Counter(
    "kvr_relay_invalid_total",
    "frames / batches / events skipped as unreadable, by reason "
    "(frames, seq, bad_msgpack, bad_envelope, bad_event, unknown_event, convert_failed; Dynamo's event plane: "
    "header, frame_header, frame_version, frame_length, envelope, envelope_mismatch, payload, unknown_rank)",
    ["reason"],
)
EVENTS_IN = Counter("kvr_relay_engine_events_total", "engine events decoded (all types)")
EVENTS_OUT = Counter("kvr_relay_router_events_total", "RouterEvents produced, by kind", ["kind"])
BLOCKS_OUT = Counter("kvr_relay_router_blocks_total", "blocks in produced stored/removed RouterEvents")
CONVERT = Counter(
    "kvr_relay_convert_total",
    "conversion outcomes, by what happened "
    "(stores_cut, unresolved_stores, dedup_stores, dedup_removes, block_size_mismatch, unknown_medium)",
    ["what"],
)
SEQ_GAPS = Counter("kvr_relay_seq_gaps_total", "forward jumps in the ZMQ sequence", ["dp_rank"])
REPLAY_REQUESTS = Counter("kvr_relay_replay_requests_total", "replay requests sent", ["dp_rank"])
REPLAYED_BATCHES = Counter("kvr_relay_replayed_batches_total", "batches recovered through the replay socket", ["dp_rank"])
UNRECOVERABLE_GAPS = Counter(
    "kvr_relay_unrecoverable_gaps_total", "gaps replay could not fill (a cleared was published)", ["dp_rank"]
)
ENGINE_RESTARTS = Counter(
    "kvr_relay_engine_restarts_total", "ZMQ sequence went backwards (a cleared was published)", ["dp_rank"]
)
DUPLICATES = Counter("kvr_relay_duplicate_batches_total", "live batches already applied by a replay", ["dp_rank"])
OTHER_DOMAIN = Counter(
    "kvr_relay_other_domain_events_total",
    "Dynamo events skipped as not of the worker's own cache, by residency_domain (cache_owner, unknown, null)",
    ["domain"],
)
CLEARED_SENT = Counter("kvr_relay_cleared_total", "cleared events emitted by the relay itself, by cause", ["cause"])

PUBLISHED_MESSAGES = Counter("kvr_relay_published_messages_total", "messages acknowledged by JetStream")
PUBLISHED_EVENTS = Counter("kvr_relay_published_events_total", "RouterEvents acknowledged by JetStream")
PUBLISHED_BLOCKS = Counter("kvr_relay_published_blocks_total", "blocks acknowledged by JetStream")
PUBLISH_DUPLICATES = Counter("kvr_relay_publish_duplicates_total", "publishes JetStream reported as duplicates")
PUBLISH_FAILURES = Counter("kvr_relay_publish_failures_total", "failed publish attempts (retried)")
DROPPED_MESSAGES = Counter("kvr_relay_dropped_messages_total", "engine batches dropped from a full buffer (oldest first)")
DROPPED_BYTES = Counter("kvr_relay_dropped_bytes_total", "encoded bytes of the engine batches dropped from a full buffer")
BUFFERED = Gauge("kvr_relay_buffer_messages", "engine batches (and clears) waiting to be converted and published")
BUFFERED_BYTES = Gauge("kvr_relay_buffer_bytes", "encoded bytes of the engine batches waiting in the buffer")
PUBLISH_SECONDS = Histogram(
    "kvr_relay_publish_seconds", "JetStream publish round trip", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
)
ID_RESERVATIONS = Counter("kvr_relay_id_reservations_total", "event-id high-water marks written to the relay bucket")

HEARTBEATS = Counter("kvr_relay_heartbeats_total", "discovery record puts")
HEARTBEAT_FAILURES = Counter("kvr_relay_heartbeat_failures_total", "failed discovery record puts")


class PublishCounters:
    """The runtime `KvEventPublisher`'s counts, as `kvr_relay_*` metrics."""

    def published(self, events: int, blocks: int, duplicate: bool, seconds: float) -> None:
        PUBLISHED_MESSAGES.inc()
        PUBLISHED_EVENTS.inc(events)
        PUBLISHED_BLOCKS.inc(blocks)
        PUBLISH_SECONDS.observe(seconds)
        if duplicate:
            PUBLISH_DUPLICATES.inc()

    def failed(self) -> None:
        PUBLISH_FAILURES.inc()

    def buffer(self, items: int, size: int) -> None:
        BUFFERED.set(items)
        BUFFERED_BYTES.set(size)

    def dropped(self, items: list[Any]) -> None:
        DROPPED_MESSAGES.inc(len(items))
        DROPPED_BYTES.inc(sum(item.size for item in items))
