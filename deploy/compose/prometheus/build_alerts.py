"""Write kvr's Prometheus alert rules from the list below, for compose and Kubernetes.

    .venv/bin/python deploy/compose/prometheus/build_alerts.py

Outputs: `prometheus/alerts.yml` (a rules file compose's Prometheus loads) and
`deploy/k8s/base/monitoring/prometheusrule.yaml` (the same group as a Prometheus Operator
PrometheusRule). Each alert is a *signal* (a PromQL expression that returns a series whenever the
metrics exist) and a condition on it; tests/deploy/test_prometheus.py checks with a real Prometheus
scraping a dev stack that every signal returns data and that no alert fires on a healthy stack, and
`promtool test rules prometheus/alerts.test.yml` checks each condition with synthetic series.

Every rule aggregates `by (namespace, ...)`: the label Kubernetes scrapes add; compose has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "alerts.yml"
K8S_OUT = HERE.parents[1] / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
GROUP = "kvr"


@dataclass(frozen=True)
class Alert:
    name: str
    signal: str  # returns data whenever the metrics exist (checked against a real dev stack)
    condition: str  # appended to the signal, e.g. "> 10000"
    for_: str
    severity: str
    summary: str
    description: str

    @property
    def expr(self) -> str:
        return f"({self.signal}) {self.condition}"


def _ratio(bad: str, metric: str, by: str, window: str = "5m") -> str:
    """bad / all, 0 (not absent) when nothing bad happened, absent when there is no traffic."""
    total = f"sum by ({by}) (rate({metric}[{window}]))"
    return f"(sum by ({by}) (rate({metric}{{{bad}}}[{window}])) or {total} * 0) / {total}"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "KvrIndexerConsumerLag",
        "max by (namespace, job, instance) (kvr_indexer_consumer_lag)",
        "> 10000", "5m", "warning",
        "An index replica is more than 10,000 KV messages behind KVR_KV",
        "{{ $labels.instance }} ({{ $labels.job }}) is {{ $value }} messages behind the KV-events stream: "
        "its routing decisions use a stale index. Check its CPU and the stream's publish rate.",
    ),
    Alert(
        "KvrBookingReplicationLag",
        "histogram_quantile(0.99, sum by (namespace, instance, le) (rate(kvr_scheduler_booking_lag_seconds_bucket[5m])))",
        "> 1", "5m", "warning",
        "Scheduler replicas apply bookings more than 1 s late (p99)",
        "{{ $labels.instance }} applies KVR_BOOKINGS events {{ $value }} s after they were published: "
        "replicas disagree on in-flight load for that long.",
    ),
    Alert(
        "KvrIndexHistoryLost",
        "sum by (namespace, pool) (increase(kvr_indexer_history_lost_total[1h]))",
        "> 0", "0m", "warning",
        "An indexer restarted after KVR_KV had dropped events newer than its snapshot",
        "Pool {{ $labels.pool }}: the index was rebuilt from what the stream still holds. Keep the snapshot "
        "interval well below --kv-max-age-s.",
    ),
    Alert(
        "KvrSnapshotFailures",
        'sum by (namespace, pool) (increase(kvr_indexer_snapshots_total{outcome="error"}[30m]))',
        "> 0", "0m", "warning",
        "Index snapshots fail to be written",
        "Pool {{ $labels.pool }}: {{ $value }} snapshot writes failed in 30 min (KVR_SNAPSHOTS object store); "
        "restarts will replay more of KVR_KV.",
    ),
    Alert(
        "KvrNoLiveWorkers",
        "sum by (namespace, pool) (max by (namespace, pool, role) (kvr_scheduler_workers))",
        "== 0", "2m", "critical",
        "No live worker in a pool",
        "Pool {{ $labels.pool }} has no live worker in KVR_WORKERS: every query answers no_workers. "
        "Check the engines' relay sidecars (discovery heartbeats).",
    ),
    Alert(
        "KvrEppErrorRatio",
        _ratio('outcome=~"internal|timeout|no_workers"', "kvr_epp_queries_total", "namespace"),
        "> 0.05", "5m", "critical",
        "More than 5 % of epp.query answers are errors",
        "{{ $value | humanizePercentage }} of routing queries end in internal, timeout or no_workers.",
    ),
    Alert(
        "KvrOverloaded",
        _ratio('outcome="overloaded"', "kvr_epp_queries_total", "namespace"),
        "> 0.01", "5m", "warning",
        "More than 1 % of requests are refused as overloaded (HTTP 429 at the gateway)",
        "{{ $value | humanizePercentage }} of routing queries found every worker busy: add workers or "
        "raise the busy thresholds.",
    ),
    Alert(
        "KvrNotReady",
        "min by (namespace, job, instance) (kvr_ready)",
        "== 0", "5m", "warning",
        "A kvr replica has not been ready for 5 minutes",
        "{{ $labels.instance }} ({{ $labels.job }}) answers /readyz 503: it has not caught up with its "
        "streams or cannot reach NATS.",
    ),
    Alert(
        "KvrTargetDown",
        'up{job=~"kvr-.*"}',
        "== 0", "2m", "critical",
        "Prometheus cannot scrape a kvr replica",
        "{{ $labels.instance }} ({{ $labels.job }}) does not answer /metrics.",
    ),
)


def rules() -> list[dict[str, Any]]:
    return [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {"summary": a.summary, "description": a.description},
        }
        for a in ALERTS
    ]


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=200, allow_unicode=True)


def render() -> str:
    return "# Generated by deploy/compose/prometheus/build_alerts.py: kvr's alert rules (compose).\n" + _dump(
        {"groups": [{"name": GROUP, "rules": rules()}]}
    )


def render_prometheusrule() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "kvr", "labels": {"app.kubernetes.io/name": "kvr", "app.kubernetes.io/part-of": "kvr"}},
        "spec": {"groups": [{"name": GROUP, "rules": rules()}]},
    }
    return (
        "# Generated by deploy/compose/prometheus/build_alerts.py: kvr's alert rules for the Prometheus\n"
        "# Operator (needs the monitoring.coreos.com CRDs; the dev overlay removes it like the ServiceMonitor).\n"
        + _dump(doc)
    )


def outputs() -> dict[Path, str]:
    return {OUT: render(), K8S_OUT: render_prometheusrule()}


if __name__ == "__main__":
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
