"""How a kvr process proves who it is to NATS and protects the connection (TLS, mutual TLS).

One declaration for every service, CLI and the relay: the `KVR_NATS_*` settings of `config.COMMON`
become a `NatsAuth`, and `NatsAuth.options()` becomes the keyword arguments of nats-py's `connect`.
Secrets are read from files (Kubernetes Secrets mounted as files) at every (re)connect, so a rotated
password or token is picked up by the next reconnect without a restart; what is read is registered
with the log redactor, so it never appears in a log line. A password or token inside the URL still
works for development and is redacted wherever the URL is printed (`redact_url`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .logs import register_secret

if TYPE_CHECKING:
    from .config import NatsConnectionConfig

DEFAULT_INBOX_ROOT = "_INBOX"


class NatsConfigError(ValueError):
    """A connection setting that cannot work (missing file, unreadable key, two auth methods...)."""


@dataclass(frozen=True)
class NatsAuth:
    """The connection's credentials and TLS files (paths, never the secrets themselves)."""

    creds: str = ""  # user JWT + NKEY seed (decentralised auth, `nsc generate creds`)
    nkey_seed: str = ""  # an NKEY user seed; the server holds only the public key
    user: str = ""
    password_file: str = ""
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_handshake_first: bool = False
    inbox_prefix: str = ""  # empty: `_INBOX.<role>` (see `inbox_prefix_for`)

    @classmethod
    def from_cfg(cls, cfg: NatsConnectionConfig) -> NatsAuth:
        """From a command's config (every one carries the NATS connection settings)."""
        return cls(**{f.name: getattr(cfg, f"nats_{f.name}") for f in fields(cls)})

    # ---- description (never a secret) ---------------------------------------------------------

    def method(self) -> str:
        if self.creds:
            return f"creds file {self.creds}"
        if self.nkey_seed:
            return f"NKEY seed file {self.nkey_seed}"
        if self.user:
            return f"user {self.user!r} with the password in {self.password_file}"
        if self.token_file:
            return f"token in {self.token_file}"
        return "no credentials"

    def tls_description(self) -> str:
        if not self.uses_tls:
            return "no TLS"
        parts = [f"CA {self.tls_ca}" if self.tls_ca else "system CAs"]
        if self.tls_cert:
            parts.append(f"client certificate {self.tls_cert}")
        if self.tls_handshake_first:
            parts.append("handshake first")
        return "TLS (" + ", ".join(parts) + ")"

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_handshake_first)

    # ---- checks and nats-py options ------------------------------------------------------------

    def validate(self) -> None:
        methods = [name for name, on in (
            ("KVR_NATS_CREDS", self.creds), ("KVR_NATS_NKEY_SEED", self.nkey_seed),
            ("KVR_NATS_USER", self.user), ("KVR_NATS_TOKEN_FILE", self.token_file),
        ) if on]
        if len(methods) > 1:
            raise NatsConfigError(f"choose one NATS authentication method, got {' and '.join(methods)}")
        if self.user and not self.password_file:
            raise NatsConfigError("KVR_NATS_USER needs KVR_NATS_PASSWORD_FILE (the password is read from a file)")
        if self.password_file and not self.user:
            raise NatsConfigError("KVR_NATS_PASSWORD_FILE needs KVR_NATS_USER")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise NatsConfigError("mutual TLS needs both KVR_NATS_TLS_CERT and KVR_NATS_TLS_KEY")
        for label, path in (
            ("KVR_NATS_CREDS", self.creds), ("KVR_NATS_NKEY_SEED", self.nkey_seed),
            ("KVR_NATS_PASSWORD_FILE", self.password_file), ("KVR_NATS_TOKEN_FILE", self.token_file),
            ("KVR_NATS_TLS_CA", self.tls_ca), ("KVR_NATS_TLS_CERT", self.tls_cert), ("KVR_NATS_TLS_KEY", self.tls_key),
        ):
            if path and not Path(path).is_file():
                raise NatsConfigError(f"{label}: no readable file at {path}")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
        except (OSError, ssl.SSLError) as exc:
            raise NatsConfigError(f"KVR_NATS_TLS_CA {self.tls_ca}: not a PEM CA bundle ({_ssl_reason(exc)})") from None
        if self.tls_cert:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise NatsConfigError(
                    f"KVR_NATS_TLS_CERT/KVR_NATS_TLS_KEY ({self.tls_cert}, {self.tls_key}): cannot load ({_ssl_reason(exc)})"
                ) from None
        return ctx

    def options(self, role: str = "") -> dict[str, Any]:
        """Keyword arguments for `nats.aio.client.Client.connect` (validated; raises NatsConfigError)."""
        self.validate()
        opts: dict[str, Any] = {"inbox_prefix": self.inbox_prefix or inbox_prefix_for(role)}
        ctx = self.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
            opts["tls_handshake_first"] = self.tls_handshake_first
        if self.creds:
            _read_secret(self.creds, "KVR_NATS_CREDS", whole=False)  # fail early and clearly when unreadable
            opts["user_credentials"] = self.creds
        elif self.nkey_seed:
            _read_secret(self.nkey_seed, "KVR_NATS_NKEY_SEED")
            opts["nkeys_seed"] = self.nkey_seed
        elif self.user:
            _read_secret(self.password_file, "KVR_NATS_PASSWORD_FILE")
            opts["user"] = self.user
            opts["password"] = _file_reader(self.password_file, "KVR_NATS_PASSWORD_FILE")
        elif self.token_file:
            _read_secret(self.token_file, "KVR_NATS_TOKEN_FILE")
            opts["token"] = _file_reader(self.token_file, "KVR_NATS_TOKEN_FILE")
        return opts


def inbox_prefix_for(role: str) -> str:
    """Reply subjects of a role: `_INBOX.<role>`. The least-privilege server config lets each role
    subscribe to its own inboxes only, so one compromised identity cannot read the replies (and the
    JetStream deliveries, which arrive on inboxes too) of the others."""
    role = role.removeprefix("kvr-")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in role)
    return f"{DEFAULT_INBOX_ROOT}.{safe}" if safe else DEFAULT_INBOX_ROOT


def _read_secret(path: str, label: str, *, whole: bool = True) -> str:
    """Read a secret file and register what it holds with the log redactor."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NatsConfigError(f"{label}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    if whole:
        value = text.strip()
        if not value:
            raise NatsConfigError(f"{label}: {path} is empty")
        register_secret(value)
        return value
    for line in text.splitlines():  # a creds file: the seed line is the secret (the JWT is not)
        line = line.strip()
        if line.startswith("SU") and len(line) > 50:
            register_secret(line)
    return ""


def _file_reader(path: str, label: str) -> Callable[[], str]:
    """nats-py calls this at every CONNECT, so a rotated secret is used by the next reconnect."""

    def read() -> str:
        return _read_secret(path, label)

    return read


def redact_url(url: str) -> str:
    """`nats://user:pw@host` → `nats://user:***@host`, `nats://token@host` → `nats://***@host`;
    comma-separated lists too. The secret is also registered with the log redactor."""
    out = []
    for item in url.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            parts = urlsplit(item if "://" in item else f"nats://{item}")
        except ValueError:
            out.append("<unparseable url>")
            continue
        if "@" not in parts.netloc:
            out.append(item)
            continue
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, sep, password = userinfo.partition(":")
        if sep:
            register_secret(password)
            masked = f"{user}:***"
        else:
            register_secret(user)
            masked = "***"
        out.append(urlunsplit((parts.scheme, f"{masked}@{hostport}", parts.path, parts.query, parts.fragment)))
    return ",".join(out)


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or exc)
