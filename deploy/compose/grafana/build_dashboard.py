"""Write the "kvr router" Grafana dashboard from the panel list below, for compose and Kubernetes.

    .venv/bin/python deploy/compose/grafana/build_dashboard.py

Outputs: `grafana/dashboards/kvr.json` (compose mounts it) and
`deploy/k8s/base/monitoring/grafana-dashboard.yaml` (a ConfigMap labelled `grafana_dashboard: "1"`,
which the Grafana Helm chart's dashboard sidecar loads). A test keeps both current, and
tests/deploy/test_prometheus.py evaluates every query against a real Prometheus scraping a dev stack.

Queries use two selector tokens: `$P` (namespace and pool, for metrics with a `pool` label) and
`$N` (namespace only); they become the dashboard's `namespace` and `pool` template variables
(`.*` = All, which also matches series without the label, as in compose).
Scheduler replicas all hold the same replicated load, so per-worker gauges take `max` across
replicas instead of summing them; every indexer and scheduler replica applies every KV event, so the
events rate is the mean over replicas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "kvr.json"
K8S_OUT = HERE.parents[1] / "k8s" / "base" / "monitoring" / "grafana-dashboard.yaml"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SELECTORS = {"$P": 'namespace=~"$namespace",pool=~"$pool"', "$N": 'namespace=~"$namespace"'}

# (row title, [(panel title, unit, [(legend, PromQL)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    (
        "Routing",
        [
            ("Routing decisions / s by outcome", "reqps",
             [("{{outcome}} {{policy}}", "sum by (outcome, policy) (rate(kvr_scheduler_decisions_total{$P}[1m]))")]),
            ("EPP queries / s by outcome", "reqps",
             [("{{outcome}} → {{routed}}", "sum by (outcome, routed) (rate(kvr_epp_queries_total{$N}[1m]))")]),
            ("KV hit rate", "percentunit",
             [("router: overlap / request blocks",
               "sum(rate(kvr_scheduler_kv_hit_ratio_sum{$P}[1m])) / sum(rate(kvr_scheduler_kv_hit_ratio_count{$P}[1m]))"),
              ("mock fleet: cached / prompt tokens",
               "sum(rate(kvr_mock_worker_cached_tokens_total{$N}[1m])) / sum(rate(kvr_mock_worker_prompt_tokens_total{$N}[1m]))")]),
            ("epp.cleanup / s by phase and outcome", "reqps",
             [("{{phase}} {{outcome}}", "sum by (phase, outcome) (rate(kvr_epp_cleanups_total{$N}[1m]))")]),
            ("live workers by pool and role", "short",
             [("{{pool}} {{role}}", "max by (pool, role) (kvr_scheduler_workers{$P})")]),
            ("ready replicas by job", "short",
             [("{{job}}", "sum by (job) (kvr_ready{$N})")]),
        ],
    ),
    (
        "Latency",
        [
            ("epp.query latency by phase (p50, p99)", "s",
             [("p50 {{phase}}", "histogram_quantile(0.5, sum by (le, phase) (rate(kvr_epp_phase_seconds_bucket{$N}[1m])))"),
              ("p99 {{phase}}", "histogram_quantile(0.99, sum by (le, phase) (rate(kvr_epp_phase_seconds_bucket{$N}[1m])))")]),
            ("scheduler.select latency by phase (p99)", "s",
             [("p99 {{phase}}",
               "histogram_quantile(0.99, sum by (le, phase) (rate(kvr_scheduler_phase_seconds_bucket{$N}[1m])))")]),
            ("NATS request handling by endpoint (p99)", "s",
             [("p99 {{endpoint}}",
               "histogram_quantile(0.99, sum by (le, endpoint) (rate(kvr_request_seconds_bucket{$N}[1m])))")]),
            ("indexer match (in-process, p99)", "s",
             [("p99 {{pool}}", "histogram_quantile(0.99, sum by (le, pool) (rate(kvr_indexer_match_seconds_bucket{$P}[1m])))")]),
        ],
    ),
    (
        "Streams and consumer lag",
        [
            ("indexer consumer lag (messages)", "short",
             [("lag {{instance}}", "max by (instance) (kvr_indexer_consumer_lag{$N})"),
              ("pending {{instance}}", "max by (instance) (kvr_indexer_consumer_pending{$N})")]),
            ("booking replication lag (p99)", "s",
             [("p99 {{instance}}",
               "histogram_quantile(0.99, sum by (le, instance) (rate(kvr_scheduler_booking_lag_seconds_bucket{$N}[1m])))")]),
            ("NATS requests / s by endpoint and outcome", "reqps",
             [("{{endpoint}} {{outcome}}", "sum by (endpoint, outcome) (rate(kvr_requests_total{$N}[1m]))")]),
            # Every replica (indexers and schedulers' index replicas) applies every event: the mean
            # over replicas is the stream's rate. (A division of a per-type sum by a replica count
            # had no label in common with it and matched nothing: the panel was always empty.)
            ("KV events applied / s", "ops",
             [("{{pool}} {{event_type}} {{outcome}}",
               "avg by (pool, event_type, outcome) (rate(kvr_indexer_events_total{$P}[1m]))")]),
        ],
    ),
    (
        "Per-worker load",
        [
            ("active decode blocks per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_blocks{$P})")]),
            ("active prefill tokens per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_prefill_tokens{$P})")]),
            ("booked requests per worker", "short",
             [("worker {{worker_id}}/{{dp_rank}}", "max by (worker_id, dp_rank) (kvr_scheduler_active_requests{$P})")]),
            ("mock fleet: KV blocks in use / running / waiting", "short",
             [("used {{worker_id}}", "max by (worker_id) (kvr_mock_worker_kv_used_blocks{$N})"),
              ("running {{worker_id}}", "max by (worker_id) (kvr_mock_worker_running{$N})"),
              ("waiting {{worker_id}}", "max by (worker_id) (kvr_mock_worker_waiting{$N})")]),
        ],
    ),
]


def expand(expr: str) -> str:
    """The selector tokens → the template-variable matchers."""
    for token, matchers in SELECTORS.items():
        expr = expr.replace(token, matchers)
    return expr


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the template variables) of every target."""
    return [(title, expand(expr)) for _, panels in ROWS for title, _, targets in panels for _, expr in targets]


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,  # on time-range change
        "includeAll": True,
        "allValue": ".*",  # also matches series without the label (compose has no namespace)
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


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
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expand(expr), "legendFormat": legend}
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
        "templating": {
            "list": [
                variable("namespace", "label_values(kvr_ready, namespace)"),
                variable("pool", 'label_values(kvr_indexer_nodes{namespace=~"$namespace"}, pool)'),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def render_configmap() -> str:
    """The same dashboard as a ConfigMap for the Grafana sidecar (label grafana_dashboard: "1")."""
    body = "\n".join("    " + line if line else "" for line in render().splitlines())
    return (
        "# Generated by deploy/compose/grafana/build_dashboard.py: the \"kvr router\" dashboard for Grafana's\n"
        "# dashboard sidecar (kube-prometheus-stack / grafana Helm chart: sidecar.dashboards.enabled, which\n"
        "# loads every ConfigMap labelled grafana_dashboard: \"1\"). The datasource uid is \"prometheus\".\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: kvr-grafana-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: kvr\n"
        "    app.kubernetes.io/part-of: kvr\n"
        "  annotations:\n"
        "    grafana_folder: kvr\n"
        "data:\n"
        "  kvr.json: |\n"
        f"{body}\n"
    )


def outputs() -> dict[Path, str]:
    return {OUT: render(), K8S_OUT: render_configmap()}


if __name__ == "__main__":
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
