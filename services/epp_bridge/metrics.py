"""Prometheus metrics of the EPP bridge (`kvr_epp_*`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
BOOKS = Counter(
    "kvr_epp_books_total", "epp.book answers by outcome (ok or error code) and booked mode (aggregated, disaggregated, none)",
    ["outcome", "routed"],
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


def query_counter(outcome: str, mode: str, routed: str):
    key = (outcome, mode, routed)
    child = _query_children.get(key)
    if child is None:
        child = _query_children[key] = QUERIES.labels(outcome, mode, routed)
    return child

# --- ext_proc (Envoy external processing, the gateway's endpoint picker protocol) -------------
EXTPROC_REQUESTS = fastmetrics.Counter(
    "kvr_epp_extproc_requests_total",
    "ext_proc requests (one per HTTP request) by outcome: routed, an error code answered with an ImmediateResponse, "
    "or aborted (the stream ended before a decision)",
    ["outcome"],
)
EXTPROC_DECISION_SECONDS = fastmetrics.Histogram(
    "kvr_epp_extproc_decision_seconds",
    "ext_proc: from the last request body chunk to the routing answer (parse, tokenize, select)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
EXTPROC_BOOKING_UPDATES = Counter(
    "kvr_epp_extproc_booking_updates_total",
    "Booking updates sent from ext_proc response events, by phase (prefill_complete, free, move) and outcome "
    "(known, unknown, or an error code)",
    ["phase", "outcome"],
)
EXTPROC_STREAMS = Gauge("kvr_epp_extproc_streams", "ext_proc streams open now")
