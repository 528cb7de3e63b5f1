"""Prometheus metrics of the simulated fleet (`kvr_mock_worker_*`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("kvr_mock_worker_requests_total", "Generate requests by outcome", ["outcome"])
PROMPT_TOKENS = Counter("kvr_mock_worker_prompt_tokens_total", "Prompt tokens of admitted requests")
CACHED_TOKENS = Counter("kvr_mock_worker_cached_tokens_total", "Prompt tokens served from the prefix cache")
OUTPUT_TOKENS = Counter("kvr_mock_worker_output_tokens_total", "Generated tokens")
PREEMPTIONS = Counter("kvr_mock_worker_preemptions_total", "Sequences preempted for lack of KV blocks")
TTFT = Histogram(
    "kvr_mock_worker_ttft_seconds",
    "Simulated time to first token, measured inside the worker (simulated seconds)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
)
KV_EVENTS = Counter("kvr_mock_worker_kv_events_total", "KV events acknowledged by JetStream")
KV_MESSAGES = Counter("kvr_mock_worker_kv_messages_total", "KV event messages acknowledged by JetStream")
KV_PUBLISH_FAILURES = Counter("kvr_mock_worker_kv_publish_failures_total", "failed KV event publish attempts (retried until acknowledged)")
KV_USED_BLOCKS = Gauge("kvr_mock_worker_kv_used_blocks", "KV blocks in use (active + cached)", ["worker_id"])
KV_ACTIVE_BLOCKS = Gauge("kvr_mock_worker_kv_active_blocks", "KV blocks held by running sequences", ["worker_id"])
RUNNING = Gauge("kvr_mock_worker_running", "Running sequences", ["worker_id"])
WAITING = Gauge("kvr_mock_worker_waiting", "Waiting sequences", ["worker_id"])
LAG = Histogram(
    "kvr_mock_worker_lag_seconds",
    "How far a pass ended behind its simulated deadline (simulated seconds); >0 means the process cannot keep up",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
)


class PublishCounters:
    """The runtime `KvEventPublisher`'s counts, as `kvr_mock_worker_kv_*` metrics."""

    def published(self, events: int, blocks: int, duplicate: bool, seconds: float) -> None:
        KV_MESSAGES.inc()
        KV_EVENTS.inc(events)

    def failed(self) -> None:
        KV_PUBLISH_FAILURES.inc()

    def buffer(self, items: int, size: int) -> None:
        return None

    def dropped(self, items: list[Any]) -> None:
        return None
