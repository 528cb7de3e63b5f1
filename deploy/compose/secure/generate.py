"""Make everything the secured compose profile needs: a development CA, the NATS server certificate,
one client certificate and one random password per kvr role, and the nats-server configuration with
TLS, mutual TLS and the least-privilege users of `services/runtime/permissions.py`.

    .venv/bin/python deploy/compose/secure/generate.py            # writes deploy/compose/secure/out/
    cd deploy/compose && docker compose -f compose.yaml -f compose.secure.yaml up

Development only: the files are world-readable so the non-root kvr containers can read them through a
bind mount, and `out/` is git-ignored. Production uses cert-manager and Kubernetes Secrets
(docs/security.md). Needs the dev dependencies (`cryptography`), i.e. the project's .venv.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.runtime.devpki import CertificateAuthority
from services.runtime.permissions import ROLES, Scope, User, accounts_config, render_conf, role_permissions

CA_NAME = "kvr-dev-ca"
SERVER_HOSTS = ("nats", "localhost", "127.0.0.1")


def generate(out: Path, pools: list[str], root: str = "/etc/kvr-secure") -> dict[str, str]:
    """Write the files under `out` (paths inside the config point below `root`); user → password."""
    ca = CertificateAuthority(out / "pki", CA_NAME, days=365)
    server = ca.issue("nats-server", server=True, client=True, hosts=SERVER_HOSTS)
    identities = [(role, Scope(pools=tuple(pools))) for role in ROLES if role != "relay"]
    identities += [("relay", Scope(pools=(pool,))) for pool in pools]
    users, passwords = [], {}
    (out / "secrets").mkdir(parents=True, exist_ok=True)
    for role, scope in identities:
        perms = role_permissions(role, scope)
        password = secrets.token_urlsafe(24)
        passwords[perms.user] = password
        path = out / "secrets" / f"{perms.user}.password"
        path.write_text(password + "\n")
        ca.issue(perms.user, client=True)
        users.append(User(perms, password=password))
    for path in (out / "pki").iterdir():
        path.chmod(0o644)  # development: readable by the containers' non-root user
    for path in (out / "secrets").iterdir():
        path.chmod(0o644)
    tls = {
        "cert_file": f"{root}/pki/{server.cert.name}",
        "key_file": f"{root}/pki/{server.key.name}",
        "ca_file": f"{root}/pki/{CA_NAME}.crt",
        "verify": True,
        "timeout": 2,
    }
    (out / "nats.conf").write_text(
        "# Written by deploy/compose/secure/generate.py: TLS + mutual TLS, one user per kvr role.\n"
        f"tls: {render_conf(tls)}\naccounts: {render_conf(accounts_config(users))}\n"
    )
    return passwords


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out"), help="output directory")
    parser.add_argument("--pool", default="default", help="pools, comma-separated (the compose KVR_POOL)")
    parser.add_argument("--root", default="/etc/kvr-secure", help="where the containers mount --out")
    args = parser.parse_args()
    generate(Path(args.out), [p for p in args.pool.split(",") if p], args.root)
    print(f"wrote {args.out}: CA, certificates, passwords and nats.conf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
