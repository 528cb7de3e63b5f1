"""Settings from CLI flags and `KVR_*` environment variables; one declaration per setting.

Each setting is declared once (name, default, help, scope). The argparse parser, the environment
variable name and the README configuration table are all derived from that declaration, so the
docs, the code and the deployment manifests cannot drift apart (a test checks the README).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from schemas.subjects import Names


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def parse_list(value: str | list[str]) -> list[str]:
    if isinstance(value, list):
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    scope: str = "all services"
    choices: Sequence[str] | None = None
    is_list: bool = False

    @property
    def env(self) -> str:
        return "KVR_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> Any:
        if self.is_list:
            return [self.type(x) for x in parse_list(raw)]
        if self.type is bool:
            return parse_bool(raw)
        return self.type(raw)


# How every process (services, CLI, relay, mock workers) authenticates to NATS and secures the
# connection; read by `natsauth.NatsAuth.from_cfg`. Secrets are files, never values (docs/security.md).
NATS_CONNECTION: tuple[Setting, ...] = (
    Setting("nats_url", "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated (a password in it is for development only)"),
    Setting("nats_creds", "", "NATS credentials file (user JWT + NKEY seed)"),
    Setting("nats_nkey_seed", "", "file holding the NATS user's NKEY seed"),
    Setting("nats_user", "", "NATS user name (password from --nats-password-file)"),
    Setting("nats_password_file", "", "file holding the NATS password (re-read at every reconnect)"),
    Setting("nats_token_file", "", "file holding a NATS token (re-read at every reconnect)"),
    Setting("nats_tls_ca", "", "CA bundle (PEM) of the NATS server certificate; turns TLS on"),
    Setting("nats_tls_cert", "", "client certificate (PEM) for mutual TLS"),
    Setting("nats_tls_key", "", "private key (PEM) of --nats-tls-cert"),
    Setting("nats_tls_handshake_first", False, "TLS handshake before the server's INFO (server tls handshake_first)", bool),
    Setting("nats_inbox_prefix", "", "reply-subject prefix (empty = _INBOX.<command>, what the role's permissions allow)"),
)

# Settings every long-running service accepts (docs/protocol.md §8).
COMMON: tuple[Setting, ...] = (
    *NATS_CONNECTION,
    Setting("pool", ["default"], "pool(s) served (repeatable or comma-separated)", is_list=True),
    Setting("subject_prefix", "kvr", "subject prefix of every subject"),
    Setting("http_port", 0, "port of /healthz /readyz /metrics (0 = pick a free port and log it)", int),
    Setting("http_host", "0.0.0.0", "address the HTTP server binds"),
    Setting("log_format", "auto", "log format", choices=("auto", "json", "console")),
    Setting("log_level", "info", "log level", choices=("debug", "info", "warning", "error")),
    Setting("otlp_endpoint", "", "OTLP/HTTP traces endpoint, e.g. http://otel:4318/v1/traces (empty = off)"),
    Setting("trace_file", "", "write finished spans as JSON lines to this file (debugging, tests)"),
    Setting("kv_stream", "KVR_KV", "KV-events stream name"),
    Setting("workers_bucket", "KVR_WORKERS", "worker discovery KV bucket"),
    Setting("bookings_stream", "KVR_BOOKINGS", "bookings stream name"),
    Setting("snapshots_bucket", "KVR_SNAPSHOTS", "index snapshot object store"),
    Setting("kv_max_age_s", 3600.0, "max age of KV events in the stream (seconds)", float),
    Setting("bookings_max_age_s", 600.0, "max age of booking events in the stream (seconds)", float),
    Setting("stream_replicas", 1, "replicas of streams/buckets created by this service", int),
    Setting("provision", True, "create streams/buckets when missing", bool),
)


@dataclass
class Registry:
    """Every setting of every command, for the README table and the manifests test."""

    groups: dict[str, tuple[Setting, ...]] = field(default_factory=dict)

    def register(self, scope: str, settings: Iterable[Setting]) -> tuple[Setting, ...]:
        items = tuple(Setting(**{**s.__dict__, "scope": scope}) for s in settings)
        self.groups[scope] = items
        return items

    def ordered_groups(self) -> list[tuple[str, tuple[Setting, ...]]]:
        """By scope name: the output must not depend on which module happened to be imported first."""
        return sorted(self.groups.items())

    def all(self) -> list[Setting]:
        seen: dict[str, Setting] = {s.name: s for s in COMMON}
        for _, items in self.ordered_groups():
            for s in items:
                seen.setdefault(s.name, s)
        return list(seen.values())


REGISTRY = Registry()


def add_settings(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    for s in settings:
        kwargs: dict[str, Any] = {"dest": s.name, "help": f"{s.help} [env {s.env}, default {s.default!r}]"}
        if s.choices:
            kwargs["choices"] = list(s.choices)
        if s.is_list:
            # Split first, convert after (in `resolve`): `--ports 1,2` must not reach int("1,2").
            kwargs["action"] = "append"
            kwargs["type"] = str
        elif s.type is bool:
            kwargs["type"] = parse_bool
            kwargs["nargs"] = "?"
            kwargs["const"] = True
        else:
            kwargs["type"] = s.type
        kwargs["default"] = None
        parser.add_argument(s.flag, **kwargs)


def resolve(args: argparse.Namespace, settings: Iterable[Setting], env: dict[str, str] | None = None) -> SimpleNamespace:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings:
        raw = getattr(args, s.name, None)
        if raw is not None:
            if s.is_list:
                raw = [item for entry in raw for item in parse_list(str(entry))]
                raw = [s.type(x) for x in raw]
            values[s.name] = raw
        elif s.env in env:
            values[s.name] = s.parse(env[s.env])
        else:
            values[s.name] = list(s.default) if isinstance(s.default, list) else s.default
    return SimpleNamespace(**values)


def names_of(cfg: Any) -> Names:
    return Names(
        prefix=cfg.subject_prefix,
        kv_stream=cfg.kv_stream,
        workers_bucket=cfg.workers_bucket,
        bookings_stream=cfg.bookings_stream,
        snapshots_bucket=cfg.snapshots_bucket,
    )


def markdown_table() -> str:
    lines = [
        "| env var | flag | default | used by | meaning |",
        "|---|---|---|---|---|",
    ]
    rows: dict[str, list[str]] = {}
    scopes: dict[str, list[str]] = {}
    for s in COMMON:
        scopes.setdefault(s.name, []).append("all services")
    for scope, items in REGISTRY.ordered_groups():
        for s in items:
            if s.name not in {c.name for c in COMMON}:
                scopes.setdefault(s.name, []).append(scope)
    for s in REGISTRY.all():
        default = ",".join(str(x) for x in s.default) if isinstance(s.default, list) else s.default
        default_text = f"`{default}`" if default not in ("", None) else "(empty)"
        rows[s.name] = [f"`{s.env}`", f"`{s.flag}`", default_text, ", ".join(dict.fromkeys(scopes[s.name])), s.help]
    for row in rows.values():
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"
