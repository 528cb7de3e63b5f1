"""A real nats-server with TLS, mutual TLS and one user per kvr role, configured from the role table.

Every identity gets a random password in a file (mode 0600) and a client certificate; `env()` gives
the `KVR_NATS_*` variables a kvr process needs to connect as that role. `secrets()` lists every
password and seed made here, for the no-secret-in-logs checks.
"""

from __future__ import annotations

import os
import secrets as pysecrets
from dataclasses import dataclass, field
from pathlib import Path

import nkeys

from services.runtime.devpki import CertificateAuthority, Issued
from services.runtime.embedded import NatsServer
from services.runtime.permissions import ROLES, Scope, User, accounts_config, render_conf, role_permissions


@dataclass
class Identity:
    role: str
    user: str
    password: str
    password_file: Path
    cert: Issued
    ca: Path
    nkey_seed_file: Path | None = None
    nkey_seed: str | None = None

    def env(self, *, mtls: bool = True, method: str = "password") -> dict[str, str]:
        env = {"KVR_NATS_TLS_CA": str(self.ca)}
        if mtls:
            env |= {"KVR_NATS_TLS_CERT": str(self.cert.cert), "KVR_NATS_TLS_KEY": str(self.cert.key)}
        if method == "nkey":
            assert self.nkey_seed_file is not None
            env["KVR_NATS_NKEY_SEED"] = str(self.nkey_seed_file)
        else:
            env |= {"KVR_NATS_USER": self.user, "KVR_NATS_PASSWORD_FILE": str(self.password_file)}
        return env


@dataclass
class SecureNats:
    base: Path
    pools: tuple[str, ...] = ("default",)
    mtls: bool = True
    handshake_first: bool = False
    nkey_roles: tuple[str, ...] = ()  # these roles authenticate with an NKEY instead of a password
    extra: tuple[tuple[str, Scope], ...] = ()  # more identities, e.g. a relay bound to one worker
    identities: dict[str, Identity] = field(default_factory=dict)
    server: NatsServer | None = None

    def __post_init__(self) -> None:
        self.ca = CertificateAuthority(self.base / "pki")
        self.server_cert = self.ca.issue("nats-server", server=True, hosts=("127.0.0.1", "localhost"))
        self.other_ca = CertificateAuthority(self.base / "other-pki", "untrusted-ca")
        users: list[User] = []
        for role, scope in self._identities():
            perms = role_permissions(role, scope)
            password = pysecrets.token_urlsafe(24)
            pw_file = self.base / "secrets" / f"{perms.user}.password"
            pw_file.parent.mkdir(parents=True, exist_ok=True)
            pw_file.write_text(password + "\n")
            pw_file.chmod(0o600)
            ident = Identity(role, perms.user, password, pw_file, self.ca.issue(perms.user, client=True), self.ca.cert_path)
            if role in self.nkey_roles:
                seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
                ident.nkey_seed = seed.decode()
                ident.nkey_seed_file = self.base / "secrets" / f"{perms.user}.nk"
                ident.nkey_seed_file.write_text(ident.nkey_seed + "\n")
                ident.nkey_seed_file.chmod(0o600)
                users.append(User(perms, nkey=nkeys.from_seed(bytearray(seed)).public_key.decode()))
            else:
                users.append(User(perms, password=password))
            self.identities[perms.user] = ident
        tls = {
            "cert_file": str(self.server_cert.cert),
            "key_file": str(self.server_cert.key),
            "ca_file": str(self.ca.cert_path),
            "verify": self.mtls,
            "timeout": 2,
        }
        if self.handshake_first:
            tls["handshake_first"] = True
        self.config_path = self.base / "nats.conf"
        self.config_path.write_text(
            f"tls: {render_conf(tls)}\naccounts: {render_conf(accounts_config(users))}\n"
        )

    def _identities(self) -> list[tuple[str, Scope]]:
        out = [(role, Scope(pools=self.pools)) for role in ROLES if role != "relay"]
        out += [("relay", Scope(pools=(pool,))) for pool in self.pools]
        return out + list(self.extra)

    def start(self) -> SecureNats:
        self.server = NatsServer(
            config_file=str(self.config_path), log_file=str(self.base / "nats-server.log"), tls_handshake_first=self.handshake_first
        ).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.tls_url

    def get(self, role: str, pool: str | None = None) -> Identity:
        user = f"kvr-relay-{pool or self.pools[0]}" if role == "relay" else f"kvr-{role}"
        return self.identities[user]

    def secrets(self) -> list[str]:
        out = [i.password for i in self.identities.values()]
        out += [i.nkey_seed for i in self.identities.values() if i.nkey_seed]
        return out

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.cleanup()
