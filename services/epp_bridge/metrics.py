"""Prometheus metrics of the EPP bridge (`kvr_epp_*`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

QUERIES = Counter(
    "kvr_epp_queries_total",
    "epp.query answers by outcome (ok or error code), requested mode and routed mode",
    ["outcome", "mode", "routed"],
)
PHASE_SECONDS = Histogram(
    "kvr_epp_phase_seconds",
    "Time spent per phase of an epp.query (parse, tokenize, select, total)",
    ["phase"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
PROMPT_TOKENS = Histogram(
    "kvr_epp_prompt_tokens",
    "Prompt tokens per routed request",
    buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144),
)
TOKEN_SOURCE = Counter("kvr_epp_token_source_total", "Where a query's tokens came from", ["source"])
CLEANUPS = Counter(
    "kvr_epp_cleanups_total", "epp.cleanup answers by phase and outcome (known, unknown or error code)", ["phase", "outcome"]
)
COMPENSATING_FREES = Counter(
    "kvr_epp_compensating_frees_total",
    "Frees sent for a booking query that failed after reaching the scheduler (e.g. select timeout), by outcome",
    ["outcome"],
)
