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

from .natsio import BOOKINGS_MAX_BYTES, KV_MAX_BYTES


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
    Setting("otlp_endpoint", "", "OTLP traces endpoint; wins over OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; over HTTP a base URL "
            "gets /v1/traces (empty: the OTEL_* variables; none set = tracing off)"),
    Setting("trace_file", "", "write finished spans as JSON lines to this file (debugging, tests)"),
    Setting("kv_stream", "KVR_KV", "KV-events stream name"),
    Setting("workers_bucket", "KVR_WORKERS", "worker discovery KV bucket"),
    Setting("bookings_stream", "KVR_BOOKINGS", "bookings stream name"),
    Setting("snapshots_bucket", "KVR_SNAPSHOTS", "index snapshot object store"),
    Setting("kv_max_age_s", 3600.0, "max age of KV events in the stream (seconds)", float),
    Setting("bookings_max_age_s", 600.0, "max age of booking events in the stream (seconds)", float),
    Setting("kv_max_bytes", KV_MAX_BYTES, "byte limit of the KV-events stream; the oldest events go first (<= 0: none)", int),
    Setting("bookings_max_bytes", BOOKINGS_MAX_BYTES, "byte limit of the bookings stream; new bookings are refused when full (<= 0: none)", int),
    Setting("stream_replicas", 1, "replicas of streams/buckets created by this service", int),
    Setting("provision", True, "create streams/buckets when missing", bool),
    Setting(
        "max_ready_lag_s",
        5.0,
        "/readyz fails while a followed stream's state is staler than this many seconds (0 = no limit)",
        float,
    ),
)


@dataclass
class Registry:
    """Every setting of every command, for the README table and the manifests test.

    `groups`: each scope's own declarations. `commands`: what each `kvr` command really parses, in
    order (COMMON included), with the defaults that command applies; the README table is built from
    these, so a command that overrides a default shows it."""

    groups: dict[str, tuple[Setting, ...]] = field(default_factory=dict)
    commands: dict[str, tuple[Setting, ...]] = field(default_factory=dict)

    def register(self, scope: str, settings: Iterable[Setting]) -> tuple[Setting, ...]:
        items = tuple(Setting(**{**s.__dict__, "scope": scope}) for s in settings)
        self.groups[scope] = items
        return items

    def command(self, name: str, settings: Iterable[Setting]) -> tuple[Setting, ...]:
        """Record the full settings of `kvr <name>` (what its parser gets) and return them."""
        items = tuple(settings)
        self.commands[name] = items
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` of hand-written client flags: the default after each help text that does not already
    give one (a flag whose default is "unset" or off — None, False, [] — has none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or default == []:
            return text
        return f"{text} (default: {default!r})" if isinstance(default, str) else f"{text} (default: {default})"


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


def default_text(value: Any) -> str:
    shown = ",".join(str(x) for x in value) if isinstance(value, list) else value
    return f"`{shown}`" if shown not in ("", None) else "(empty)"


# The long-running services: a COMMON setting they all parse is "used by all services".
SERVICES = ("epp-bridge", "indexer", "mock-workers", "relay", "scheduler")


def markdown_table() -> str:
    """One row per setting: which commands parse it and, where they differ, each command's default."""
    lines = [
        "| env var | flag | default | used by | meaning |",
        "|---|---|---|---|---|",
    ]
    order = [s.name for s in REGISTRY.all()]
    first: dict[str, Setting] = {s.name: s for s in REGISTRY.all()}
    users: dict[str, dict[str, Any]] = {name: {} for name in order}  # setting → command → default
    helps: dict[str, dict[str, list[str]]] = {}  # setting → help text → commands
    for command, items in sorted(REGISTRY.commands.items()):
        for s in items:
            users.setdefault(s.name, {})[command] = s.default
            helps.setdefault(s.name, {}).setdefault(s.help, []).append(command)
            if s.name not in first:
                first[s.name] = s
                order.append(s.name)
    common = {s.name for s in COMMON}
    for name in order:
        s, by_command = first[name], users[name]
        if not by_command:  # declared, but no command registered (a partial import): scope only
            by_command = {s.scope: s.default}
        commands = list(by_command)
        if name in common and set(SERVICES) <= set(commands):
            who = ["all services", *(c for c in commands if c not in SERVICES)]
        else:
            who = commands
        defaults: dict[str, list[str]] = {}
        for command, value in by_command.items():
            defaults.setdefault(default_text(value), []).append(command)
        if len(defaults) == 1:
            default_cell = next(iter(defaults))
        else:
            default_cell = "; ".join(f"{text} ({', '.join(cmds)})" for text, cmds in defaults.items())
        meaning = s.help + "".join(
            f"; {', '.join(cmds)}: {text}" for text, cmds in helps.get(name, {}).items() if text != s.help
        )
        row = [f"`{s.env}`", f"`{s.flag}`", default_cell, ", ".join(who), meaning]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"
