"""Settings from CLI flags and `KVR_*` environment variables; one declaration per setting.

Each command's settings are one frozen, typed class (a `Config`): a field per setting, declared
with `setting(default, help)`; its annotation gives the parser (`int`, `float`, `bool`,
`float | None`, `tuple[X, ...]` for a repeatable/comma-separated list). The argparse flags, the
`KVR_*` environment variables, the `--help` text and the README configuration table are derived
from these declarations, so the docs, the code and the deployment manifests cannot drift apart (a
test checks the README).

One service embeds another's settings with `embed(OtherConfig, name=default, ...)`: the embedding
command parses the other's flags too (its own declarations win a shared name; `name=default`
overrides a default), and the embedded config is built from the same values, so a setting has one
value per process (the one-process bridge embeds the scheduler, which embeds its index replica).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypeVar, dataclass_transform

from schemas.subjects import Names

from .natsauth import redact_url
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


def parse_opt_float(raw: str) -> float | None:
    """A float, or None for "" / none / off (a threshold that is off)."""
    raw = str(raw).strip().lower()
    if raw in ("", "none", "off"):
        return None
    return float(raw)


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    scope: str = "all services"
    choices: Sequence[str] | None = None
    is_list: bool = False
    secret: bool = False  # shown as *** in a config's repr

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

    def default_value(self) -> Any:
        return list(self.default) if isinstance(self.default, list) else self.default


# ---- typed configs ------------------------------------------------------------------------------

_SETTING = "kvr.setting"  # field metadata: a `_Declared`
_EMBED = "kvr.embed"  # field metadata: an `_Embedded`
T = TypeVar("T")
C = TypeVar("C", bound="Config")


@dataclass(frozen=True)
class _Declared:
    default: Any
    help: str
    parse: Callable[[str], Any] | None
    choices: Sequence[str] | None
    secret: bool


@dataclass(frozen=True)
class _Embedded:
    cls: type[Config]
    defaults: Mapping[str, Any]


def setting(
    default: T, help: str, parse: Callable[[str], Any] | None = None, *,
    choices: Sequence[str] | None = None, secret: bool = False,
) -> T:
    """Declare a setting as a field of a `Config` (typed as its default for the type checker).
    `parse` only where the annotation does not say it (a custom parser)."""
    meta = _Declared(default, help, parse, choices, secret)
    f: Any = field(default=default, metadata={_SETTING: meta})
    return typing.cast(T, f)


def embed(cls: type[C], **defaults: Any) -> C:
    """Declare that this config carries `cls`'s settings, built from the same values;
    `defaults` overrides some of its defaults in the embedding command."""
    unknown = set(defaults) - {s.name for s in cls.settings()}
    if unknown:
        raise TypeError(f"{cls.__name__} has no settings {sorted(unknown)}")
    f: Any = field(default_factory=lambda: cls.build(defaults), metadata={_EMBED: _Embedded(cls, dict(defaults))})
    return typing.cast(C, f)


def same_as(cls: type[Config], name: str) -> Any:
    """Reuse another config's declaration of `name` (one help text and default for both)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta: _Declared = f.metadata[_SETTING]
    return field(default=meta.default, metadata={_SETTING: meta})


def _parser_of(name: str, annotation: Any, meta: _Declared) -> tuple[Callable[[str], Any], bool]:
    """(parser of one item, is a list) from a field's annotation."""
    list_ = typing.get_origin(annotation) is tuple
    item = typing.get_args(annotation)[0] if list_ else annotation
    if meta.parse is not None:
        return meta.parse, list_
    if item in (bool, int, float, str):
        return item, list_
    if typing.get_origin(item) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(item)):
        return str, list_  # its choices: the Literal's values
    if isinstance(item, types.UnionType) and set(typing.get_args(item)) == {float, type(None)}:
        return parse_opt_float, list_
    raise TypeError(f"setting {name!r}: no parser for {annotation!r}; pass parse=")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field,))
def config(cls: type[C]) -> type[C]:
    """Make `cls` a frozen, keyword-only dataclass of settings and derive its `Setting`s."""
    cls = dataclass(frozen=True, kw_only=True, repr=False)(cls)
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    declared: list[Setting] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_SETTING)
        if meta is None or f.name not in own:
            continue
        parse, is_list = _parser_of(f.name, hints[f.name], meta)
        if is_list and not isinstance(meta.default, tuple):
            raise TypeError(f"setting {f.name!r}: a list setting's default is a tuple")
        default = list(meta.default) if is_list else meta.default
        choices = meta.choices
        if choices is None and typing.get_origin(hints[f.name]) is typing.Literal:
            choices = typing.get_args(hints[f.name])
        declared.append(Setting(f.name, default, meta.help, parse, choices=choices, is_list=is_list, secret=meta.secret))
    cls._own = tuple(declared)
    cls._flat = None
    return cls


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class Config:
    """Base of the per-command settings classes (declare them with `@config`)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @config

    _own: ClassVar[tuple[Setting, ...]] = ()
    _flat: ClassVar[tuple[Setting, ...] | None] = None

    @classmethod
    def own_settings(cls) -> tuple[Setting, ...]:
        """The settings declared in this class itself (not inherited, not embedded)."""
        own: tuple[Setting, ...] = cls.__dict__.get("_own", ())
        return own

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """What the command parses, in order: inherited, own, then each embedded config's (its
        names not already declared, with the embedding defaults)."""
        if cls.__dict__.get("_flat") is None:
            out: dict[str, Setting] = {}
            for base in reversed(cls.__mro__):
                for s in base.__dict__.get("_own", ()):
                    out.setdefault(s.name, s)
            for f in dataclasses.fields(cls):
                emb = f.metadata.get(_EMBED)
                if emb is None:
                    continue
                for s in emb.cls.settings():
                    if s.name not in out:
                        out[s.name] = dataclasses.replace(s, default=emb.defaults[s.name]) if s.name in emb.defaults else s
            cls._flat = tuple(out.values())
        flat: tuple[Setting, ...] = cls.__dict__["_flat"]
        return flat

    @classmethod
    def build(cls, values: Mapping[str, Any] | None = None, /, **overrides: Any) -> Self:
        """A config from setting values by name (missing ones take their defaults), embedded
        configs included; an unknown name is an error."""
        given = {**(values or {}), **overrides}
        settings = cls.settings()
        unknown = set(given) - {s.name for s in settings}
        if unknown:
            raise TypeError(f"{cls.__name__} has no settings {sorted(unknown)}")
        flat = {s.name: given[s.name] if s.name in given else s.default_value() for s in settings}
        return cls._make(flat)

    @classmethod
    def from_argv(cls, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Self:
        """A config from command-line flags as the command parses them (tests, benches)."""
        parser = argparse.ArgumentParser()
        add_settings(parser, cls.settings())
        return resolve(parser.parse_args(list(argv)), cls, env)

    @classmethod
    def _make(cls, flat: Mapping[str, Any]) -> Self:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            emb = f.metadata.get(_EMBED)
            if emb is not None:
                kwargs[f.name] = emb.cls._make(flat)
            elif _SETTING in f.metadata:
                kwargs[f.name] = _freeze(flat[f.name])
        return cls(**kwargs)

    def __post_init__(self) -> None:
        # A setting has one value per process: an embedded config takes the embedding one's
        # values of the names both declare (also when a config is constructed directly).
        own = {f.name for f in dataclasses.fields(self) if _SETTING in f.metadata}
        for f in dataclasses.fields(self):
            if _EMBED not in f.metadata:
                continue
            sub = getattr(self, f.name)
            shared = {
                n.name: getattr(self, n.name)
                for n in dataclasses.fields(sub)
                if n.name in own and getattr(sub, n.name) != getattr(self, n.name)
            }
            if shared:
                object.__setattr__(self, f.name, dataclasses.replace(sub, **shared))

    def values(self) -> dict[str, Any]:
        """Every setting's value by name, embedded configs' included (the embedding one's win)."""
        out: dict[str, Any] = {}
        embedded: list[Config] = []
        for f in dataclasses.fields(self):
            if _EMBED in f.metadata:
                embedded.append(getattr(self, f.name))
            elif _SETTING in f.metadata:
                out[f.name] = getattr(self, f.name)
        for sub in embedded:
            for k, v in sub.values().items():
                out.setdefault(k, v)
        return out

    def with_values(self, **values: Any) -> Self:
        """A copy with some settings changed (by name, embedded ones included)."""
        return type(self).build({**self.values(), **values})

    def __repr__(self) -> str:
        secret = {s.name for s in self.settings() if s.secret}
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in secret and value:
                text = "'***'"
            elif f.name == "nats_url":
                text = repr(redact_url(value))
            else:
                text = repr(value)
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"


# How every process (services, CLI, relay, mock workers) authenticates to NATS and secures the
# connection; read by `natsauth.NatsAuth.from_cfg`. Secrets are files, never values (docs/security.md).
@config
class NatsConnectionConfig(Config):
    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated (a password in it is for development only)")
    nats_creds: str = setting("", "NATS credentials file (user JWT + NKEY seed)", secret=True)
    nats_nkey_seed: str = setting("", "file holding the NATS user's NKEY seed", secret=True)
    nats_user: str = setting("", "NATS user name (password from --nats-password-file)")
    nats_password_file: str = setting("", "file holding the NATS password (re-read at every reconnect)", secret=True)
    nats_token_file: str = setting("", "file holding a NATS token (re-read at every reconnect)", secret=True)
    nats_tls_ca: str = setting("", "CA bundle (PEM) of the NATS server certificate; turns TLS on")
    nats_tls_cert: str = setting("", "client certificate (PEM) for mutual TLS")
    nats_tls_key: str = setting("", "private key (PEM) of --nats-tls-cert", secret=True)
    nats_tls_handshake_first: bool = setting(False, "TLS handshake before the server's INFO (server tls handshake_first)")
    nats_inbox_prefix: str = setting("", "reply-subject prefix (empty = _INBOX.<command>, what the role's permissions allow)")


# Settings every long-running service accepts (docs/protocol.md §8).
@config
class ServiceConfig(NatsConnectionConfig):
    pool: tuple[str, ...] = setting(("default",), "pool(s) served (repeatable or comma-separated)")
    subject_prefix: str = setting("kvr", "subject prefix of every subject")
    http_port: int = setting(0, "port of /healthz /readyz /metrics (0 = pick a free port and log it)")
    http_host: str = setting("0.0.0.0", "address the HTTP server binds")
    log_format: str = setting("auto", "log format", choices=("auto", "json", "console"))
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    otlp_endpoint: str = setting("", "OTLP traces endpoint; wins over OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; over HTTP a base URL "
                                 "gets /v1/traces (empty: the OTEL_* variables; none set = tracing off)")
    trace_file: str = setting("", "write finished spans as JSON lines to this file (debugging, tests)")
    kv_stream: str = setting("KVR_KV", "KV-events stream name")
    workers_bucket: str = setting("KVR_WORKERS", "worker discovery KV bucket")
    bookings_stream: str = setting("KVR_BOOKINGS", "bookings stream name")
    snapshots_bucket: str = setting("KVR_SNAPSHOTS", "index snapshot object store")
    kv_max_age_s: float = setting(3600.0, "max age of KV events in the stream (seconds)")
    bookings_max_age_s: float = setting(600.0, "max age of booking events in the stream (seconds)")
    kv_max_bytes: int = setting(KV_MAX_BYTES, "byte limit of the KV-events stream; the oldest events go first (<= 0: none)")
    bookings_max_bytes: int = setting(
        BOOKINGS_MAX_BYTES, "byte limit of the bookings stream; new bookings are refused when full (<= 0: none)"
    )
    stream_replicas: int = setting(1, "replicas of streams/buckets created by this service")
    provision: bool = setting(True, "create streams/buckets when missing")
    max_ready_lag_s: float = setting(
        5.0, "/readyz fails while a followed stream's state is staler than this many seconds (0 = no limit)"
    )


@config
class ClientConfig(NatsConnectionConfig):
    """What a client tool (`kvr replay`) takes of the common settings: the NATS connection and these."""

    pool: tuple[str, ...] = same_as(ServiceConfig, "pool")
    subject_prefix: str = same_as(ServiceConfig, "subject_prefix")
    log_format: str = same_as(ServiceConfig, "log_format")
    log_level: str = same_as(ServiceConfig, "log_level")


@config
class NamesConfig(Config):
    """The settings that name subjects, streams and buckets (`kvr nats-config`)."""

    pool: tuple[str, ...] = same_as(ServiceConfig, "pool")
    subject_prefix: str = same_as(ServiceConfig, "subject_prefix")
    kv_stream: str = same_as(ServiceConfig, "kv_stream")
    workers_bucket: str = same_as(ServiceConfig, "workers_bucket")
    bookings_stream: str = same_as(ServiceConfig, "bookings_stream")
    snapshots_bucket: str = same_as(ServiceConfig, "snapshots_bucket")


NATS_CONNECTION: tuple[Setting, ...] = NatsConnectionConfig.settings()
COMMON: tuple[Setting, ...] = ServiceConfig.settings()


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


# argparse's None means "flag not given"; a flag whose value parses to None ("off" for a threshold)
# is carried as this marker instead, so it wins over the variable and the default.
_GIVEN_NONE = object()


def _flag_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        value = parse(raw)
        return _GIVEN_NONE if value is None else value

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in its error messages
    return convert


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
            kwargs["type"] = _flag_parser(s.type)
        kwargs["default"] = None
        parser.add_argument(s.flag, **kwargs)


def resolve_values(args: argparse.Namespace, settings: Iterable[Setting], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings:
        raw = getattr(args, s.name, None)
        if raw is _GIVEN_NONE:
            values[s.name] = None
        elif raw is not None:
            if s.is_list:
                raw = [item for entry in raw for item in parse_list(str(entry))]
                raw = [s.type(x) for x in raw]
            values[s.name] = raw
        elif s.env in env:
            values[s.name] = s.parse(env[s.env])
        else:
            values[s.name] = s.default_value()
    return values


def resolve(args: argparse.Namespace, cls: type[C], env: Mapping[str, str] | None = None) -> C:
    """The command's config from its parsed flags, the environment and the defaults."""
    return cls.build(resolve_values(args, cls.settings(), env))


class NamedConfig(Protocol):
    @property
    def subject_prefix(self) -> str: ...
    @property
    def kv_stream(self) -> str: ...
    @property
    def workers_bucket(self) -> str: ...
    @property
    def bookings_stream(self) -> str: ...
    @property
    def snapshots_bucket(self) -> str: ...


def names_of(cfg: NamedConfig) -> Names:
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
        every_service = name in common and set(SERVICES) <= set(commands)
        who = ["all services", *(c for c in commands if c not in SERVICES)] if every_service else commands
        defaults: dict[str, list[str]] = {}
        for command, value in by_command.items():
            defaults.setdefault(default_text(value), []).append(command)
        default_cell = (
            next(iter(defaults)) if len(defaults) == 1 else "; ".join(f"{text} ({', '.join(cmds)})" for text, cmds in defaults.items())
        )
        meaning = s.help + "".join(
            f"; {', '.join(cmds)}: {text}" for text, cmds in helps.get(name, {}).items() if text != s.help
        )
        row = [f"`{s.env}`", f"`{s.flag}`", default_cell, ", ".join(who), meaning]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"
