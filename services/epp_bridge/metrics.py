"""Prometheus metrics of the EPP bridge (`kvr_epp_*`)."""

from __future__ import annotations

from prometheus_client import Counter

from services.runtime import fastmetrics

QUERIES = fastmetrics.Counter(
    "kvr_epp_queries_total",
    "epp.query answers by outcome (ok or error code), requested mode and routed mode",
    ["outcome", "mode", "routed"],
)
PHASE_SECONDS = fastmetrics.Histogram(
    "kvr_epp_phase_seconds",
    "Time spent per phase of an epp.query (parse, tokenize, select, total)",
    ["phase"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
PROMPT_TOKENS = fastmetrics.Histogram(
    "kvr_epp_prompt_tokens",
    "Prompt tokens per routed request",
    buckets=(16, 64, 256, 1024, 4096, 16384, 65536, 262144),
)
TOKEN_SOURCE = fastmetrics.Counter("kvr_epp_token_source_total", "Where a query's tokens came from", ["source"])
CLEANUPS = fastmetrics.Counter(
    "kvr_epp_cleanups_total", "epp.cleanup answers by phase and outcome (known, unknown or error code)", ["phase", "outcome"]
)
COMPENSATING_FREES = Counter(
    "kvr_epp_compensating_frees_total",
    "Frees sent for a booking query that failed after reaching the scheduler (e.g. select timeout), by outcome",
    ["outcome"],
)

# Children resolved once: `labels()` costs a lock and a dict lookup on every request.
PHASE_PARSE = PHASE_SECONDS.labels("parse")
PHASE_TOKENIZE = PHASE_SECONDS.labels("tokenize")
PHASE_SELECT = PHASE_SECONDS.labels("select")
PHASE_TOTAL = PHASE_SECONDS.labels("total")
TOKEN_SOURCE_CHILDREN = {s: TOKEN_SOURCE.labels(s) for s in ("token_data", "prompt_ids", "tokenizer")}
_query_children: dict[tuple[str, str, str], object] = {}


def query_counter(outcome: str, mode: str, routed: str):  # type: ignore[no-untyped-def]
    key = (outcome, mode, routed)
    child = _query_children.get(key)
    if child is None:
        child = _query_children[key] = QUERIES.labels(outcome, mode, routed)
    return child
