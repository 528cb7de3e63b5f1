"""`kvr nats-config`: the nats-server accounts, users and permissions of every kvr role, from the one
role table (`services.runtime.permissions`).

    kvr nats-config --pool llama,qwen                 # nats-server config: `accounts { KVR { ... } }`
    kvr nats-config --pool llama --format helm        # values for the official NATS chart (config.merge + env)
    kvr nats-config --format table                    # the role/subject table of docs/security.md
    kvr nats-config --nkeys-dir keys/                 # NKEY users for every keys/<user>.pub (no secret at all)

Passwords are never written: each user's password is an environment reference
(`$PASSWORD_KVR_<ROLE>`) that nats-server resolves at start, fed from the same Kubernetes Secret
the kvr pod mounts as its KVR_NATS_PASSWORD_FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import HelpFormatter, NamesConfig, add_settings, names_of, resolve
from .permissions import (
    Raw,
    Scope,
    User,
    accounts_config,
    default_identities,
    helm_value,
    markdown_table,
    password_env,
    render_conf,
    role_permissions,
)


def users_for(cfg: NamesConfig, relay_bucket: str = "KVR_RELAY", nkeys_dir: Path | None = None) -> list[User]:
    """One user per identity; with `nkeys_dir`, identities that have `<user>.pub` (NKEY public keys,
    one per line) get one NKEY user per key instead of a password: no secret in the server config,
    and a key is rotated by adding the new one, rolling the pods, then removing the old one."""
    names = names_of(cfg)
    users = []
    for role, scope in default_identities(cfg.pool):
        perms = role_permissions(role, Scope(names=names, pools=scope.pools, relay_bucket=relay_bucket))
        pub = nkeys_dir / f"{perms.user}.pub" if nkeys_dir is not None else None
        if pub is not None and pub.is_file():
            keys = [line.strip() for line in pub.read_text().splitlines() if line.strip() and not line.startswith("#")]
            bad = [k for k in keys if not (k.startswith("U") and len(k) == 56)]
            if bad or not keys:
                raise ValueError(f"{pub}: want NKEY user public keys (U..., 56 characters), one per line")
            users += [User(perms, nkey=key) for key in keys]
        else:
            users.append(User(perms, password=Raw("$" + password_env(perms.user))))
    return users


def helm_values(users: Sequence[User], secret_prefix: str = "kvr-nats-") -> dict[str, Any]:
    """`config.merge.accounts` plus the nats container's env entries that read each password from
    the user's Secret (`<secret_prefix><user without kvr->`, key `password`)."""
    env = {
        password_env(u.permissions.user): {
            "valueFrom": {"secretKeyRef": {"name": secret_prefix + u.permissions.user.removeprefix("kvr-"), "key": "password"}}
        }
        for u in users
        if u.nkey is None
    }
    return {"config": {"merge": {"accounts": helm_value(accounts_config(users))}}, "container": {"env": env}}


def to_yaml(values: dict[str, Any]) -> str:
    """YAML with pyyaml (a development dependency); the router image has none, and JSON is YAML too."""
    try:
        import yaml
    except ImportError:
        return json.dumps(values, indent=2) + "\n"
    return str(yaml.safe_dump(values, sort_keys=False, width=200))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvr nats-config", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    add_settings(parser, NamesConfig.settings())
    parser.add_argument("--relay-bucket", default="KVR_RELAY", help="the relays' event-id bucket (relay --relay-bucket)")
    parser.add_argument("--format", choices=["conf", "helm", "table"], default="conf",
                        help="conf: nats-server accounts; helm: values for the NATS chart; table: the role/subject table")
    parser.add_argument(
        "--nkeys-dir", default=None,
        help="folder of <user>.pub NKEY public keys: those users get NKEYs, not passwords (default: none, passwords for all)",
    )
    args = parser.parse_args(argv)
    cfg = resolve(args, NamesConfig)
    if args.format == "table":
        print(markdown_table(cfg.pool, names_of(cfg)), end="")
        return 0
    users = users_for(cfg, args.relay_bucket, Path(args.nkeys_dir) if args.nkeys_dir else None)
    if args.format == "helm":
        print(to_yaml(helm_values(users)), end="")
    else:
        print("accounts: " + render_conf(accounts_config(users)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
