"""The Helm chart deploy/helm/kvr: values against their schema, template references, and — with a
`helm` binary on PATH (or KVR_HELM) — `helm lint` and `helm template` rendered objects validated like
the kustomize tree. No package registry this project uses ships a helm binary, so without one the
rendering tests skip, as the overlay tests do without kubectl/kustomize.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.config_table import load_all
from services.runtime.config import REGISTRY

from .manifests import REPO, by_kind, containers, load_yaml, pod_spec, tool, validate_k8s

pytestmark = pytest.mark.unit

CHART = REPO / "deploy" / "helm" / "kvr"
VALUE_FILES = {
    "default": None,
    "full": CHART / "ci" / "full-values.yaml",
    "identities": CHART / "ci" / "identities-values.yaml",
}


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _merged(values_file: Path | None) -> dict[str, Any]:
    base = load_yaml(CHART / "values.yaml")
    if values_file is None:
        return base

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) and v else v
        return out

    return merge(base, load_yaml(values_file))


def test_chart_metadata():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "kvr" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


@pytest.mark.parametrize("name", VALUE_FILES)
def test_values_validate_against_the_schema(name: str):
    jsonschema.Draft7Validator(_schema()).validate(_merged(VALUE_FILES[name]))


@pytest.mark.parametrize(
    "bad",
    [
        {"pools": []},
        {"blockSize": 0},
        {"routing": {"policy": "fastest"}},
        {"extProc": {"port": 70000}},
        {"extProc": {"labelFilters": ["no-equals-sign"]}},
        {"schedular": {"replicas": 2}},  # a typo is an error, not an ignored key
        {"extraEnv": {"LOG_LEVEL": "debug"}},
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]):
    values = _merged(None)
    for k, v in bad.items():
        values[k] = {**values[k], **v} if isinstance(v, dict) and isinstance(values.get(k), dict) else v
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_schema()).validate(values)


def _template_text() -> str:
    return "\n".join(p.read_text() for p in sorted((CHART / "templates").iterdir()))


def test_every_values_reference_in_the_templates_exists_in_values_yaml():
    values = load_yaml(CHART / "values.yaml")
    missing = []
    for ref in sorted(set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", _template_text()))):
        node: Any = values
        for part in ref.strip(".").split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(ref)
                break
            node = node[part]
    assert not missing, f"templates read values that values.yaml does not define: {missing}"


def test_every_kvr_variable_of_the_chart_is_a_setting():
    load_all()
    known = {s.env for s in REGISTRY.all()}
    text = _template_text()  # ConfigMap keys and container env names (not stream names in comments)
    used = set(re.findall(r"^\s*(KVR_[A-Z0-9_]+):", text, re.M)) | set(re.findall(r"name: (KVR_[A-Z0-9_]+)\b", text))
    assert used and used <= known, sorted(used - known)
    assert "KVR_GRPC_PORT" in used and "KVR_EPP_TOKENIZER_DIR" in used


# --- rendered with helm ------------------------------------------------------------------------


def helm_command() -> str | None:
    return os.environ.get("KVR_HELM") or tool("helm")


needs_helm = pytest.mark.skipif(
    helm_command() is None,
    reason="no helm binary (PATH or KVR_HELM): chart not rendered (values, schema and template references are still checked)",
)


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    helm = helm_command()
    assert helm is not None
    args = [helm, "template", "edge", str(CHART), "--namespace", "kvr"]
    if VALUE_FILES[name] is not None:
        args += ["--values", str(VALUE_FILES[name])]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@needs_helm
@pytest.mark.parametrize("name", VALUE_FILES)
def test_helm_lint(name: str):
    helm = helm_command()
    assert helm is not None
    args = [helm, "lint", str(CHART), "--strict"]
    if VALUE_FILES[name] is not None:
        args += ["--values", str(VALUE_FILES[name])]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_helm
@pytest.mark.parametrize("name", VALUE_FILES)
def test_rendered_objects_validate_and_the_bridge_is_the_endpoint_picker(name: str):
    docs = rendered(name)
    values = _merged(VALUE_FILES[name])
    for doc in docs:
        validate_k8s(doc)
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    configmaps = by_kind(docs, "ConfigMap")
    expected = {"scheduler", "epp-bridge"} | ({"indexer"} if values["indexer"]["enabled"] else set())
    assert {n.rsplit("-kvr-", 1)[-1] for n in deployments} == expected
    for dep_name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert services[dep_name]["spec"]["selector"].items() <= labels.items()
        assert pdbs[dep_name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = containers(dep)
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        for ref in container["envFrom"]:
            assert ref["configMapRef"]["name"] in configmaps
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod_spec(dep).get("volumes", [])}
    common = configmaps["edge-kvr-common"]["data"]
    assert common["KVR_POOL"] == ",".join(values["pools"]) and common["KVR_NATS_URL"] == values["nats"]["url"]
    scheduler = configmaps["edge-kvr-scheduler"]["data"]
    assert int(scheduler["KVR_BLOCK_SIZE"]) == values["blockSize"] and scheduler["KVR_SELECTION_POLICY"] == values["routing"]["policy"]
    bridge_env = configmaps["edge-kvr-epp-bridge"]["data"]
    bridge = deployments["edge-kvr-epp-bridge"]
    assert bridge["spec"]["replicas"] == values["eppBridge"]["replicas"]
    grpc = next(p for p in services["edge-kvr-epp-bridge"]["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert grpc["appProtocol"] == "http2" and grpc["port"] == int(bridge_env["KVR_GRPC_PORT"]) == values["extProc"]["port"]
    assert bridge_env["KVR_GRPC_POOL"] in values["pools"]
    if values["extProc"]["tls"]["secretName"]:
        assert bridge_env["KVR_GRPC_TLS_CERT"].startswith("/etc/kvr/grpc-tls/")
    if values["tokenizers"]["dirs"]:
        entries = dict(e.split("=", 1) for e in bridge_env["KVR_EPP_TOKENIZER_DIR"].split(","))
        assert set(entries) <= set(values["pools"]) and all(d.startswith(values["tokenizers"]["mountPath"]) for d in entries.values())
    pools = by_kind(docs, "InferencePool")
    if values["inferencePool"]["enabled"]:
        (pool,) = pools.values()
        ref = pool["spec"]["endpointPickerRef"]
        assert ref["name"] == "edge-kvr-epp-bridge" and ref["port"]["number"] == grpc["port"]
    else:
        assert not pools
