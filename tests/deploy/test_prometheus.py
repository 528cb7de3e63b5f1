"""The dashboard and the alert rules against a real Prometheus (Debian's `prometheus` package:
`prometheus` and `promtool`; skipped cleanly where they are not installed, `.ci/run` installs them).

- `promtool check rules` on both rule files and `promtool test rules` on the unit tests of the alerts;
- a dev stack (nats-server, indexer, scheduler, EPP bridge, mock workers, and a Mooncake replay as
  traffic) scraped by a real Prometheus with the `namespace` label Kubernetes scrapes add: every
  dashboard query (with its `namespace`/`pool` variables set) and every alert's signal must return
  data, the variables' label queries must find the values, every rule must evaluate without error,
  and the alerts that watch for breakage must stay silent on this healthy stack.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.embedded import NatsServer, free_port, terminate
from services.runtime.procs import ServiceProcess

from .manifests import COMPOSE_DIR, K8S, REPO
from .test_compose import _alerts_module, _dashboard_module

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
NAMESPACE, POOL = "kvr-test", "dev"
# Alerts that watch for breakage: none of them may even be pending on a healthy stack.
MUST_STAY_SILENT = {"KvrIndexHistoryLost", "KvrSnapshotFailures", "KvrNoLiveWorkers", "KvrTargetDown", "KvrNotReady"}


def promtool(*args: str, cwd: Path) -> str:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@needs_promtool
@pytest.mark.unit
def test_promtool_checks_both_rule_files_and_runs_the_alert_unit_tests(tmp_path):
    prom_dir = COMPOSE_DIR / "prometheus"
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml", cwd=prom_dir)
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    (tmp_path / "k8s-rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    assert f"SUCCESS: {len(_alerts_module().ALERTS)} rules found" in promtool("check", "rules", "k8s-rules.yml", cwd=tmp_path)
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml", cwd=prom_dir)
    tested = {t["alertname"] for case in yaml.safe_load((prom_dir / "alerts.test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert tested == {a.name for a in _alerts_module().ALERTS}, "every alert has a unit test"


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def dashboard_queries() -> list[tuple[str, str]]:
    """Every panel query with the variables set to this stack's namespace and pool."""
    return [
        (title, expr.replace("$namespace", NAMESPACE).replace("$pool", POOL))
        for title, expr in _dashboard_module().queries()
    ]


@needs_prometheus
@pytest.mark.integration
def test_every_dashboard_query_and_alert_signal_returns_data_from_a_scraped_dev_stack(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    nats = NatsServer(store_dir=str(tmp_path / "nats")).start()
    services = [
        ServiceProcess("indexer", ["--snapshot-interval-s", "2"], nats_url=nats.url, pools=[POOL]),
        ServiceProcess("scheduler", ["--seed", "1"], nats_url=nats.url, pools=[POOL]),
        ServiceProcess("epp-bridge", [], nats_url=nats.url, pools=[POOL]),
        ServiceProcess("mock-workers", ["--count", "4", "--speedup", "10"], nats_url=nats.url, pools=[POOL]),
    ]
    prom_proc = replay = None
    prom_log, replay_log = open(logs / "prometheus.log", "wb"), open(logs / "replay.log", "wb")  # noqa: SIM115
    try:
        for svc in services:
            svc.log_path = str(logs / f"{svc.command}.log")
            svc.start()
        for svc in services:
            svc.wait_ready(90)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(_alerts_module().OUT)],
            "scrape_configs": [
                {"job_name": f"kvr-{svc.command}",
                 "static_configs": [{"targets": [f"127.0.0.1:{svc.http_port}"], "labels": {"namespace": NAMESPACE}}]}
                for svc in services
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom_proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=prom_log, stderr=subprocess.STDOUT,
        )
        replay = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "replay", str(REPO / "data" / "mooncake_synthetic_trace.jsonl.gz"),
             "--fleet", "external", "--nats-url", nats.url, "--pool", POOL, "--start", "3000", "--limit", "120",
             "--speedup", "10", "--workers", "4", "--max-output-tokens", "16", "--progress", "false",
             "--out", str(tmp_path / "replay")],
            cwd=REPO, stdout=replay_log, stderr=subprocess.STDOUT,
        )

        queries = dashboard_queries() + [(f"alert {a.name}", a.signal) for a in _alerts_module().ALERTS]
        empty: dict[str, str] = dict(queries)
        deadline = time.monotonic() + 150
        while empty and time.monotonic() < deadline:
            time.sleep(2)
            if prom_proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(logs / 'prometheus.log').read_text()[-2000:]}")
            for title, expr in list(empty.items()):
                try:
                    if api(port, "query", query=expr)["result"]:
                        del empty[title]
                except OSError:
                    break  # Prometheus still starting
        assert not empty, f"queries that returned no data: {json.dumps(empty, indent=1)}"

        # The template variables' label queries find this stack's namespace and pool.
        assert api(port, "label/namespace/values", **{"match[]": "kvr_ready"}) == [NAMESPACE]
        assert POOL in api(port, "label/pool/values", **{"match[]": f'kvr_indexer_nodes{{namespace=~"{NAMESPACE}"}}'})
        # Every rule evaluates (no error), none fires, and the breakage detectors are not even pending.
        rules = [r for g in api(port, "rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {a.name for a in _alerts_module().ALERTS}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        active = {a["labels"]["alertname"]: a["state"] for a in api(port, "alerts")["alerts"]}
        assert "firing" not in active.values(), active
        assert not (MUST_STAY_SILENT & set(active)), active
    finally:
        for proc in (replay, prom_proc):
            if proc is not None:
                terminate(proc, 10)
        for svc in reversed(services):
            svc.terminate()
        nats.cleanup()
        prom_log.close()
        replay_log.close()
