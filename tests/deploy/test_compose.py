"""`deploy/compose/compose.yaml`: valid Compose, runnable kvr commands, the promised topology."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from services.cli import COMMANDS

from .manifests import COMPOSE_DIR, REPO, load_yaml, yaml_files

pytestmark = pytest.mark.unit

SCHEMA = COMPOSE_DIR / "schema" / "compose-spec.json"


@cache
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "compose.yaml")


def kvr_services() -> dict[str, dict[str, Any]]:
    """Services that run the kvr image (their command starts with a kvr subcommand)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if str(svc.get("image", "")).startswith("${IMAGE")
    }


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses_without_duplicate_keys(path: Path) -> None:
    from .manifests import load_docs

    load_docs(path)


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # ...and the schema does reject a wrong file (unknown service key, wrong replicas type).
    broken = json.loads(json.dumps(compose()))
    broken["services"]["indexer"]["replica"] = 2
    broken["services"]["nats"]["ports"] = "4222:4222"
    assert len(list(validator_cls(schema).iter_errors(broken))) >= 2


def _help(command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, f"kvr {command} --help failed:\n{out.stderr}"
    return out.stdout


def test_every_kvr_service_runs_an_existing_subcommand_with_known_flags() -> None:
    services = kvr_services()
    assert {"indexer", "scheduler", "epp-bridge", "mock-workers", "replay"} <= services.keys()
    commands = {name: [str(a) for a in svc["command"]] for name, svc in services.items()}
    for name, argv in commands.items():
        assert argv and argv[0] in COMMANDS, f"service {name}: {argv[:1]} is not a kvr subcommand"
    subcommands = sorted({argv[0] for argv in commands.values()})
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = dict(zip(subcommands, pool.map(_help, subcommands), strict=True))
    for name, argv in commands.items():
        flags = {re.split("=", a, maxsplit=1)[0] for a in argv[1:] if a.startswith("--")}
        known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", helps[argv[0]]))
        assert flags <= known, f"service {name}: kvr {argv[0]} does not accept {sorted(flags - known)}"


def test_router_services_are_replicated_and_wait_for_nats() -> None:
    services = compose()["services"]
    for name in ("indexer", "scheduler", "epp-bridge"):
        assert services[name]["deploy"]["replicas"] == 2, name
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy"
    for name in ("indexer", "scheduler"):
        assert "ports" not in services[name], "replicas cannot share a published host port"
    assert "deploy" not in services["mock-workers"] or services["mock-workers"]["deploy"].get("replicas", 1) >= 1
    replay = services["replay"]
    assert replay["profiles"] == ["replay"], "the replay job runs only on demand"
    assert replay["restart"] == "no"


def test_epp_bridge_publishes_its_ext_proc_port_once_per_replica() -> None:
    import re

    bridge = compose()["services"]["epp-bridge"]
    grpc_port = bridge["environment"]["KVR_GRPC_PORT"]
    (mapping,) = bridge["ports"]
    m = re.fullmatch(r"\$\{EPP_GRPC_PORTS:-(\d+)-(\d+)\}:(\d+)", mapping)
    assert m, mapping
    first, last, container = (int(g) for g in m.groups())
    assert container == int(grpc_port) and last - first + 1 >= bridge["deploy"]["replicas"]


def test_nats_has_jetstream_persistence_healthcheck_and_monitoring() -> None:
    spec = compose()
    nats = spec["services"]["nats"]
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert store in volumes and volumes[store] in spec["volumes"], "JetStream store must be a named volume"
    assert command[command.index("-m") + 1] == "8222" and "8222:8222" in nats["ports"]
    assert "8222/healthz" in " ".join(nats["healthcheck"]["test"])


def test_prometheus_scrapes_every_kvr_service_on_its_http_port() -> None:
    prom = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    targets: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[name] = sd["port"]
    for name, svc in kvr_services().items():
        if svc.get("healthcheck", {}).get("disable"):
            continue  # a client job without an HTTP server (replay)
        env = svc["environment"]
        assert targets.get(name) == int(env["KVR_HTTP_PORT"]), f"prometheus does not scrape {name}"
        probe = " ".join(svc["healthcheck"]["test"])
        assert f":{env['KVR_HTTP_PORT']}/readyz" in probe, f"{name}: healthcheck must probe /readyz"
    static = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    exporter = compose()["services"]["nats-exporter"]["command"]
    assert f"nats-exporter:{exporter[exporter.index('-port') + 1]}" in static


def test_grafana_mounts_provisioning_and_a_dashboard_that_exist() -> None:
    grafana = compose()["services"]["grafana"]
    for volume in grafana["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE_DIR / source).exists(), source
    datasource = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    uid = datasource["datasources"][0]["uid"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/")
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / Path(home).name).read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def _dashboard_module() -> Any:
    return _load(COMPOSE_DIR / "grafana" / "build_dashboard.py", "kvr_build_dashboard")


def _alerts_module() -> Any:
    return _load(COMPOSE_DIR / "prometheus" / "build_alerts.py", "kvr_build_alerts")


def _load(path: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("builder", ["grafana/build_dashboard.py", "prometheus/build_alerts.py"])
def test_generated_dashboards_and_rules_are_current(builder: str) -> None:
    module = _dashboard_module() if "dashboard" in builder else _alerts_module()
    outputs = module.outputs()
    assert len(outputs) == 2  # compose and Kubernetes
    for path, text in outputs.items():
        assert path.read_text() == text, f"run: .venv/bin/python deploy/compose/{builder}"


def test_compose_prometheus_loads_the_alert_rules() -> None:
    prom = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose()["services"]["prometheus"]["volumes"] if v.startswith("."))
    for rule_file in prom["rule_files"]:
        source = next(src for src, target in mounts.items() if target == rule_file)
        assert (COMPOSE_DIR / source).resolve() == _alerts_module().OUT


METRIC_MODULES = (
    "services.runtime.responder",
    "services.indexer.metrics",
    "services.scheduler.metrics",
    "services.epp_bridge.metrics",
    "services.mock_worker.metrics",
)


def test_dashboard_and_alerts_query_only_metrics_the_services_export() -> None:
    import importlib

    from prometheus_client import REGISTRY

    for module in METRIC_MODULES:
        importlib.import_module(module)
    exported = set(REGISTRY._names_to_collectors)  # every sample name, suffixes included
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "kvr.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a.expr for a in _alerts_module().ALERTS]
    used = {name for expr in exprs for name in re.findall(r"\b([a-z][a-z0-9_]*_[a-z0-9_]+)\s*[{(\[]", expr)}
    used = {n for n in used if n.startswith("kvr_")}
    assert len(used) >= 20
    unknown = {n for n in used if n not in exported}
    assert not unknown, f"the dashboard or the alerts query metrics no service exports: {sorted(unknown)}"


def test_replay_and_external_mock_fleet_run_at_the_same_speed() -> None:
    services = compose()["services"]
    replay = services["replay"]
    assert "--fleet=external" in replay["command"]
    assert replay["environment"]["KVR_SPEEDUP"] == services["mock-workers"]["environment"]["KVR_SPEEDUP"]


def test_replay_job_reads_a_shipped_trace_by_default() -> None:
    """The default mount is the repository's data/ folder and the default file is in it."""
    replay = compose()["services"]["replay"]
    mounts = {target: source for source, target, _mode in (v.rsplit(":", 2) for v in replay["volumes"])}
    source = re.fullmatch(r"\$\{TRACE_DIR:-([^}]+)\}", mounts["/home/kvr/data"])
    assert source is not None, mounts
    folder = (COMPOSE_DIR / source.group(1)).resolve()
    assert folder == REPO / "data"
    trace = re.fullmatch(r"data/\$\{TRACE_FILE:-([^}]+)\}", replay["command"][1])
    assert trace is not None and (folder / trace.group(1)).is_file(), replay["command"]
