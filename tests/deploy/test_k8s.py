"""Kubernetes manifests: schema-valid (offline), overlays render, and the pool is wired as designed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from .manifests import (
    K8S,
    OVERLAYS,
    UnknownKind,
    by_kind,
    containers,
    example_files,
    kustomization_resources,
    kustomize_command,
    load_docs,
    load_yaml,
    pod_spec,
    render,
    validate_k8s,
)

pytestmark = pytest.mark.unit

ROUTER_SERVICES = ("indexer", "scheduler", "epp-bridge")
needs_kustomize = pytest.mark.skipif(
    kustomize_command() is None,
    reason="neither kubectl nor kustomize is installed: overlays not rendered "
    "(base and example manifests are still schema-checked by the other tests)",
)


def _plain_manifests() -> list[Path]:
    """Complete manifests on disk: base and overlay resources, examples (patches are partial)."""
    files = kustomization_resources(K8S / "base")
    for overlay in OVERLAYS:
        files += kustomization_resources(K8S / "overlays" / overlay)
    return sorted(set(files)) + example_files()


@pytest.mark.parametrize("path", _plain_manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_validates(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        validate_k8s(doc)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    for doc in docs:
        validate_k8s(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == f"kvr{'-dev' if overlay == 'dev' else ''}"


def test_validation_rejects_a_broken_manifest() -> None:
    """The checks above can fail: a misspelt field, a wrong type and an unknown kind are caught."""
    deployment = load_docs(K8S / "base" / "indexer.yaml")[0]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = typo["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(typo)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(wrong_type)
    pool = load_docs(K8S / "examples" / "gaie" / "inferencepool.yaml")[0]
    pool["spec"]["endpointPickerRef"]["portNumber"] = 9002
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(pool)
    with pytest.raises(UnknownKind):
        validate_k8s({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def _check_router_pool(docs: Any, min_replicas: int) -> None:
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    for svc_name in ROUTER_SERVICES:
        name = f"kvr-{svc_name}"
        dep = deployments[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert dep["spec"]["replicas"] >= min_replicas, name
        spec = pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["args"][0] == svc_name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert "memory" in container["resources"]["limits"]
        # Service, PDB and HPA all point at this Deployment's pods.
        svc = services[name]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] == "http" and "http" in ports
        if svc_name == "epp-bridge":  # ext_proc for gateways, on the port the ConfigMap sets
            grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
            assert grpc["appProtocol"] == "http2" and ports[grpc["targetPort"]] == grpc["port"]
            bridge_env = next(d for n, d in by_kind(docs, "ConfigMap").items() if n.startswith("kvr-epp-bridge"))["data"]
            assert int(bridge_env["KVR_GRPC_PORT"]) == grpc["port"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = hpas[name]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert min_replicas <= hpa["minReplicas"] <= hpa["maxReplicas"]


@needs_kustomize
def test_dev_overlay_pool_shape() -> None:
    docs = render(K8S / "overlays" / "dev")
    _check_router_pool(docs, min_replicas=2)
    assert "kvr-mock-workers" in by_kind(docs, "Deployment")
    assert not by_kind(docs, "ServiceMonitor"), "dev clusters may lack the Prometheus Operator CRDs"


@needs_kustomize
def test_production_overlay_pool_shape() -> None:
    docs = render(K8S / "overlays" / "production")
    _check_router_pool(docs, min_replicas=3)
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    common = next(d for n, d in by_kind(docs, "ConfigMap").items() if n.startswith("kvr-common"))
    assert common["data"]["KVR_STREAM_REPLICAS"] == "3"
    for dep in by_kind(docs, "Deployment").values():
        image = pod_spec(dep)["containers"][0]["image"]
        assert image.count(":") == 1 and not image.endswith(":dev"), image
    # ServiceMonitor selects the Services on their named port.
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in by_kind(docs, "Service").values() if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {f"kvr-{s}" for s in ROUTER_SERVICES}
    for svc in selected:
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    (rule,) = by_kind(docs, "PrometheusRule").values()
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} >= {
        "KvrIndexerConsumerLag", "KvrIndexHistoryLost", "KvrSnapshotFailures", "KvrNoLiveWorkers",
        "KvrEppErrorRatio", "KvrOverloaded", "KvrNotReady",
    }


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_sidecar_gets_the_same_dashboard_as_compose(overlay: str) -> None:
    import json

    docs = render(K8S / "overlays" / overlay)
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap").values() if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    compose_json = (K8S.parent / "compose" / "grafana" / "dashboards" / "kvr.json").read_text()
    assert json.loads(dashboard["data"]["kvr.json"]) == json.loads(compose_json)
    assert {v["name"] for v in json.loads(compose_json)["templating"]["list"]} == {"namespace", "pool"}
    if overlay == "dev":
        assert not by_kind(docs, "PrometheusRule"), "dev clusters may lack the Prometheus Operator CRDs"


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_reference_resolves_and_http_port_matches(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    configmaps = by_kind(docs, "ConfigMap")
    for dep in by_kind(docs, "Deployment").values():
        for container in containers(dep):
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                name = source["configMapRef"]["name"]
                assert name in configmaps, f"{dep['metadata']['name']}: ConfigMap {name} not rendered"
                env.update(configmaps[name].get("data", {}))
            env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
            http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
            assert env["KVR_HTTP_PORT"] == str(http), dep["metadata"]["name"]
            assert env["KVR_NATS_URL"].startswith("tls://" if overlay == "production" else "nats://")
    scheduler = pod_spec(by_kind(docs, "Deployment")["kvr-scheduler"])["containers"][0]
    router_id = {e["name"]: e for e in scheduler.get("env", [])}["KVR_ROUTER_ID"]
    assert router_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_nats_helm_values_describe_a_three_node_jetstream_cluster() -> None:
    prod = load_yaml(K8S / "nats" / "values-production.yaml")
    assert {k: prod["config"]["cluster"][k] for k in ("enabled", "replicas")} == {"enabled": True, "replicas": 3}
    js = prod["config"]["jetstream"]
    assert js["enabled"] is True and js["fileStore"]["enabled"] is True and js["fileStore"]["pvc"]["enabled"] is True
    assert prod["config"]["monitor"]["enabled"] is True
    dev = load_yaml(K8S / "nats" / "values-dev.yaml")
    assert dev["config"]["jetstream"]["enabled"] is True
    assert dev["config"]["cluster"]["enabled"] is False
    # R3 streams need at least 3 JetStream servers.
    literals = load_yaml(K8S / "overlays" / "production" / "kustomization.yaml")["configMapGenerator"][0]["literals"]
    assert "KVR_STREAM_REPLICAS=3" in literals
    assert prod["config"]["cluster"]["replicas"] >= 3


def test_relay_sidecar_uses_the_downward_api() -> None:
    (worker,) = load_docs(K8S / "examples" / "vllm-worker.yaml")
    spec = pod_spec(worker)
    (relay,) = [c for c in spec["initContainers"] if c["name"] == "kvr-relay"]
    assert relay["restartPolicy"] == "Always" and relay["args"][0] == "relay"
    env = {e["name"]: e for e in relay["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    engine = next(c for c in spec["containers"] if c["name"] == "vllm")
    engine_args = " ".join(engine["args"])
    # The relay subscribes to the ports the engine publishes on.
    assert "tcp://*:5557" in engine_args and env["KVR_ZMQ"]["value"] == "tcp://127.0.0.1:5557"
    assert "tcp://*:5558" in engine_args and env["KVR_REPLAY"]["value"] == "tcp://127.0.0.1:5558"
    assert str(engine["ports"][0]["containerPort"]) == env["KVR_PORT"]["value"]


def test_inference_pool_points_at_the_epp_and_the_vllm_pods() -> None:
    docs = load_docs(K8S / "examples" / "gaie" / "inferencepool.yaml")
    (pool,) = by_kind(docs, "InferencePool").values()
    (worker,) = load_docs(K8S / "examples" / "vllm-worker.yaml")
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    engine_ports = {p["containerPort"] for c in pod_spec(worker)["containers"] for p in c["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= engine_ports
    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = by_kind(docs, "Service")[ref["name"]]
    assert ref["port"]["number"] in {p["port"] for p in epp_svc["spec"]["ports"]}
    route = next(iter(by_kind(docs, "HTTPRoute").values()))
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    # The picker is the kvr bridge itself: gRPC ext_proc on the Service port, declared like GAIE's EPP.
    (port,) = [p for p in epp_svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port["name"] == "grpc-ext-proc" and port["appProtocol"] == "http2" and port["protocol"] == "TCP"
    deployments = by_kind(docs, "Deployment")
    bridge = next(d for d in deployments.values() if d["spec"]["selector"]["matchLabels"].items() <= epp_svc["spec"]["selector"].items())
    (container,) = containers(bridge)
    assert container["args"] == ["epp-bridge"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["KVR_GRPC_PORT"]) == named[port["targetPort"]] == ref["port"]["number"]
    assert env["KVR_GRPC_TLS_CERT"] and env["KVR_GRPC_TLS_KEY"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(env["KVR_GRPC_TLS_CERT"].startswith(m + "/") for m in mounts)
    # Active-active: several replicas, a PodDisruptionBudget, no leader election, no plugin config.
    assert bridge["spec"]["replicas"] >= 2
    (pdb,) = by_kind(docs, "PodDisruptionBudget").values()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(bridge).items()
    assert 1 <= pdb["spec"]["minAvailable"] < bridge["spec"]["replicas"]
    text = (K8S / "examples" / "gaie" / "inferencepool.yaml").read_text()
    assert "leader-election" not in text and "EndpointPickerConfig" not in text
    assert not by_kind(docs, "ConfigMap") and not by_kind(docs, "Role")


def pod_spec_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _settings_value(env: dict[str, str], name: str) -> float:
    from services.config_table import load_all
    from services.runtime.config import REGISTRY

    load_all()
    setting = next(s for s in REGISTRY.all() if s.env == name)
    return float(env.get(name, setting.default))


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retention_settings_agree(overlay: str) -> None:
    """Bookings outlive their TTL in the stream; indexer snapshots are far younger than KVR_KV."""
    docs = render(K8S / "overlays" / overlay)
    data: dict[str, dict[str, str]] = {}
    for name, cm in by_kind(docs, "ConfigMap").items():
        data[name.rsplit("-", 1)[0]] = cm.get("data", {})
    common, scheduler, indexer = data["kvr-common"], data["kvr-scheduler"], data["kvr-indexer"]
    bookings_age = _settings_value(common, "KVR_BOOKINGS_MAX_AGE_S")
    assert bookings_age >= _settings_value(scheduler, "KVR_BOOKING_TTL_S")
    kv_age = _settings_value(common, "KVR_KV_MAX_AGE_S")
    assert 0 < _settings_value(indexer, "KVR_SNAPSHOT_INTERVAL_S") <= kv_age / 10
