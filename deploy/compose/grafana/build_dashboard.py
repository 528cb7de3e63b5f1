"""Write grafana/dashboards/kvr.json (the "kvr router" dashboard) from the panel list below.

    .venv/bin/python deploy/compose/grafana/build_dashboard.py

Scheduler replicas all hold the same replicated load, so per-worker gauges take `max` across
replicas instead of summing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "kvr.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# (row title, [(panel title, unit, [(legend, PromQL)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    (
        "Routing",
        [
            ("Routing decisions / s by outcome", "reqps",
             [("{{outcome}} {{policy}}", "sum by (outcome, policy) (rate(kvr_scheduler_decisions_total[1m]))")]),
            ("EPP queries / s by outcome", "reqps",
             [("{{outcome}} → {{routed}}", "sum by (outcome, routed) (rate(kvr_epp_queries_total[1m]))")]),
            ("KV hit rate", "percentunit",
             [("router: overlap / request blocks",
               "sum(rate(kvr_scheduler_kv_hit_ratio_sum[1m])) / sum(rate(kvr_scheduler_kv_hit_ratio_count[1m]))"),
              ("mock fleet: cached / prompt tokens",
               "sum(rate(kvr_mock_worker_cached_tokens_total[1m])) / sum(rate(kvr_mock_worker_prompt_tokens_total[1m]))")]),
            ("epp.cleanup / s by phase and outcome", "reqps",
             [("{{phase}} {{outcome}}", "sum by (phase, outcome) (rate(kvr_epp_cleanups_total[1m]))")]),
        ],
    ),
    (
        "Latency",
        [
            ("epp.query latency by phase (p50, p99)", "s",
             [("p50 {{phase}}", "histogram_quantile(0.5, sum by (le, phase) (rate(kvr_epp_phase_seconds_bucket[1m])))"),
              ("p99 {{phase}}", "histogram_quantile(0.99, sum by (le, phase) (rate(kvr_epp_phase_seconds_bucket[1m])))")]),
            ("scheduler.select latency by phase (p99)", "s",
             [("p99 {{phase}}",
               "histogram_quantile(0.99, sum by (le, phase) (rate(kvr_scheduler_phase_seconds_bucket[1m])))")]),
            ("NATS request handling by endpoint (p99)", "s",
             [("p99 {{endpoint}}",
               "histogram_quantile(0.99, sum by (le, endpoint) (rate(kvr_request_seconds_bucket[1m])))")]),
            ("indexer match (in-process, p99)", "s",
             [("p99 {{pool}}", "histogram_quantile(0.99, sum by (le, pool) (rate(kvr_indexer_match_seconds_bucket[1m])))")]),
        ],
    ),
    (
        "Streams and consumer lag",
        [
            ("indexer consumer lag (messages)", "short",
             [("lag {{instance}}", "max by (instance) (kvr_indexer_consumer_lag)"),
              ("pending {{instance}}", "max by (instance) (kvr_indexer_consumer_pending)")]),
            ("booking replication lag (p99)", "s",
             [("p99 {{instance}}",
               "histogram_quantile(0.99, sum by (le, instance) (rate(kvr_scheduler_booking_lag_seconds_bucket[1m])))")]),
            ("JetStream consumers: pending messages", "short",
             [("{{stream_name}} {{consumer_name}}", "sum by (stream_name, consumer_name) (jetstream_consumer_num_pending)")]),
            ("KV events applied / s", "ops",
             [("{{event_type}} {{outcome}}",
               "sum by (event_type, outcome) (rate(kvr_indexer_events_total[1m])) / count(count by (instance) (kvr_indexer_nodes))")]),
        ],
    ),
    (
        "Per-worker load",
        [
            ("active decode blocks per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_blocks)")]),
            ("active prefill tokens per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_prefill_tokens)")]),
            ("booked requests per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_requests)")]),
            ("mock fleet: KV blocks in use / running / waiting", "short",
             [("used {{worker_id}}", "max by (worker_id) (kvr_mock_worker_kv_used_blocks)"),
              ("running {{worker_id}}", "max by (worker_id) (kvr_mock_worker_running)"),
              ("waiting {{worker_id}}", "max by (worker_id) (kvr_mock_worker_waiting)")]),
        ],
    ),
]


def panel(panel_id: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    panel_id = 1
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append(panel(panel_id, title, unit, targets, x=12 * (i % 2), y=y + 8 * (i // 2)))
            panel_id += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "uid": "kvr-router",
        "title": "kvr router",
        "tags": ["kvr"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(OUT)
