"""NATS connection and idempotent provisioning of the streams, bucket and object store (docs/protocol.md §1)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from prometheus_client import Counter, Gauge

from schemas.subjects import Names

from .logs import get_logger, redact
from .natsauth import NatsAuth, NatsConfigError, redact_url

log = get_logger("kvr.nats")

CONNECT_FAILURES = Counter("kvr_nats_connect_failures_total", "Failed NATS (re)connect attempts, by cause", ["kind"])
PERMISSION_DENIED = Counter(
    "kvr_nats_permission_denied_total", "Publishes or subscriptions the NATS server refused (permissions violation)", ["op"]
)
CONNECTED = Gauge("kvr_nats_connected", "1 while connected to a NATS server")

# Failure kinds of a (re)connect attempt; `authorization`, `tls` and `config` need an operator.
OPERATOR_KINDS = frozenset({"authorization", "tls", "config"})
_PRIORITY = {"authorization": 5, "tls": 4, "config": 3, "timeout": 2, "unreachable": 1}
_PERMISSION_RE = re.compile(r'permissions violation for (publish|subscription) to "?([^"]*)"?', re.IGNORECASE)
_MAX_DENIED_SUBJECTS = 1024


class ProvisioningError(RuntimeError):
    """An existing stream/bucket whose configuration conflicts with what this service needs."""


class NatsUnreachable(ConnectionError):
    """A bounded connect (`max_wait_s`) that did not succeed in time; the message is one line that
    names the server (without credentials) and the cause."""


def describe_failure(exc: BaseException, auth: NatsAuth) -> tuple[str, str]:
    """(kind, one-line cause) of a failed connect, naming the setting to fix, never a secret."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, NatsConfigError):
        return "config", text
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or text
        ca = auth.tls_ca or "unset, so the system CAs"
        return "tls", f"the NATS server certificate is not trusted ({why}); KVR_NATS_TLS_CA is {ca}"
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or text)
        if "CERTIFICATE_REQUIRED" in reason.upper():
            if auth.tls_cert:
                return "tls", f"the NATS server rejected the client certificate {auth.tls_cert} ({reason})"
            return "tls", "the NATS server requires a client certificate (mutual TLS): set KVR_NATS_TLS_CERT and KVR_NATS_TLS_KEY"
        if any(word in reason.upper() for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")):
            return "tls", f"the NATS server rejected the client certificate {auth.tls_cert or '(none)'} ({reason})"
        if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD_LAYER" in reason.upper():
            return "tls", f"TLS handshake failed ({reason}): does the server speak TLS, and is handshake_first the same on both sides?"
        return "tls", f"TLS handshake failed ({reason})"
    if "authorization violation" in low or ("authentication" in low and ("expired" in low or "revoked" in low)):
        return "authorization", f"the NATS server rejected the credentials ({auth.method()}): {text.removeprefix('nats: ')}"
    if "no ssl context" in low or "secure connection" in low or "tls required" in low:
        return "tls", "the NATS server requires TLS: set KVR_NATS_TLS_CA (the CA of its certificate)"
    if "tls" in low and "not" in low and ("available" in low or "configured" in low):
        return "tls", f"the NATS server does not offer TLS ({text}); unset KVR_NATS_TLS_* or enable TLS on the server"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        tls_hint = auth.uses_tls and not auth.tls_handshake_first
        hint = " (a server with TLS handshake_first needs KVR_NATS_TLS_HANDSHAKE_FIRST=true)" if tls_hint else ""
        return "timeout", f"no answer in time{hint}"
    if isinstance(exc, OSError):
        return "unreachable", exc.strerror or f"{type(exc).__name__}: {text}"
    if isinstance(exc, nats.errors.NoServersError):
        return "unreachable", "no NATS server could be reached"
    return "error", f"{type(exc).__name__}: {text}"


@dataclass
class ConnectionState:
    """What `/readyz` and the logs say about this process's NATS connection (nothing secret)."""

    servers: str = ""
    auth: str = ""
    tls: str = ""
    state: str = "connecting"  # connecting | connected | reconnecting | closed
    attempts: int = 0
    error_kind: str | None = None
    error: str | None = None
    since: float = field(default_factory=time.time)
    denied: dict[str, set[str]] = field(default_factory=lambda: {"publish": set(), "subscription": set()})
    denied_total: int = 0

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def reason(self) -> str | None:
        """Why this process is not usable, or None while connected."""
        if self.connected:
            return None
        if self.error:
            return f"NATS {self.state}: {self.error_kind}: {self.error}"
        return f"NATS {self.state}"

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "servers": self.servers, "auth": self.auth, "tls": self.tls}
        if not self.connected:
            out["attempts"] = self.attempts
        if self.error and not self.connected:
            out["error_kind"], out["error"] = self.error_kind, self.error
        if self.denied_total:
            out["permission_denied"] = {
                "total": self.denied_total,
                "subjects": {op: sorted(subjects)[:20] for op, subjects in self.denied.items() if subjects},
            }
        return out

    def note_denied(self, message: str) -> bool:
        """Record a permissions violation; True the first time this (operation, subject) is seen."""
        m = _PERMISSION_RE.search(message)
        op, subject = (m.group(1).lower(), m.group(2)) if m else ("publish", message)
        PERMISSION_DENIED.labels("subscribe" if op == "subscription" else "publish").inc()
        self.denied_total += 1
        seen = self.denied.setdefault(op, set())
        if subject in seen or len(seen) >= _MAX_DENIED_SUBJECTS:
            return False
        seen.add(subject)
        return True


async def connect(
    url: str,
    name: str,
    *,
    auth: NatsAuth | None = None,
    state: ConnectionState | None = None,
    connect_timeout: float = 2.0,
    max_wait_s: float | None = None,
) -> NATS:
    """Connect with retry/backoff (the server may start after us) and reconnect forever afterwards.

    Unbounded (`max_wait_s=None`, services): a failure is logged once per distinct cause (an error
    line for credentials, TLS and settings, a warning for an unreachable server) and kept in `state`
    for `/readyz`, and the attempts go on. Bounded (clients): the first connect logs nothing; each
    attempt is cut to the time left, and after `max_wait_s` it raises `NatsUnreachable` with the last
    cause in one line, so a command-line client can print it and exit. nats-py's own retry loop is
    off for the first connect (its `max_reconnect_attempts=0` means *unlimited*, and a refused
    connection would loop inside `nc.connect` for ever); reconnecting is switched on once connected.
    A publish or subscription the server refuses is logged once per subject and counted in
    `kvr_nats_permission_denied_total`; our own close or drain logs `nats.closed` at info.
    """
    auth = auth or NatsAuth()
    state = state if state is not None else ConnectionState()
    servers = [u.strip() for u in url.split(",") if u.strip()]
    state.servers, state.auth, state.tls = redact_url(url), auth.method(), auth.tls_description()
    if state.auth == "no credentials" and "@" in url:
        state.auth = "credentials in the URL (development only)"
    attempt_errors: list[BaseException] = []  # what the servers said during one first-connect attempt
    generic_streak = 0
    delay = 0.1
    loop = asyncio.get_running_loop()
    deadline = None if max_wait_s is None else loop.time() + max_wait_s
    last_logged: tuple[str, str] | None = None

    def failed(exc: BaseException, info: dict[str, Any] | None = None) -> tuple[str, str]:
        nonlocal last_logged, generic_streak
        # The most telling of what this attempt saw: a TLS alert beats the connection reset after it.
        seen = [describe_failure(e, auth) for e in (*attempt_errors, exc) if not isinstance(e, nats.errors.NoServersError)]
        if info and info.get("tls_verify") and not auth.tls_cert:
            # The server's INFO said it verifies client certificates; with TLS 1.3 its refusal often
            # reaches us as a bare reset, so say what the INFO told us.
            seen.append(("tls", "the NATS server requires a client certificate (mutual TLS): set KVR_NATS_TLS_CERT and KVR_NATS_TLS_KEY"))
        kind, reason = max(seen or [describe_failure(exc, auth)], key=lambda kr: _PRIORITY.get(kr[0], 0))
        reason = redact(reason)
        state.attempts += 1
        CONNECT_FAILURES.labels(kind).inc()
        # A specific cause (credentials, TLS, settings) is not overwritten by one vaguer failure: with
        # TLS 1.3 a rejected client certificate shows up as a reset as often as an alert.
        if kind not in OPERATOR_KINDS and state.error_kind in OPERATOR_KINDS:
            generic_streak += 1
            if generic_streak < 3:
                return state.error_kind, state.error or ""
        generic_streak = 0
        state.error_kind, state.error = kind, reason
        quiet = deadline is not None and state.state == "connecting"  # a bounded first connect: the caller reports
        if (kind, reason) != last_logged and not quiet:
            last_logged = (kind, reason)
            level = log.error if kind in OPERATOR_KINDS else log.warning
            event = "nats.connect_failed" if state.state == "connecting" else "nats.reconnect_failed"
            level(event, kind=kind, reason=reason, servers=state.servers, auth=state.auth, tls=state.tls)
        return kind, reason

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        if "permissions violation" in text.lower():
            if state.note_denied(text):
                m = _PERMISSION_RE.search(text)
                log.error(
                    "nats.permission_denied",
                    op=m.group(1).lower() if m else "?",
                    subject=m.group(2) if m else text,
                    auth=state.auth,
                    hint="this NATS user lacks the permission (docs/security.md has every role's subjects)",
                )
            return
        if state.state == "connecting":
            attempt_errors.append(exc)  # the attempt raises too; `failed` reports it once
            return
        failed(exc)
        if state.state == "reconnecting":
            refresh_tls()  # the next attempt uses the certificate files as they are by then

    async def on_disconnect() -> None:
        if nc.is_closed or nc.is_draining:
            return  # our own close or drain at shutdown, not an outage
        if state.state == "connected":
            state.state = "reconnecting"
            CONNECTED.set(0)
            log.warning("nats.disconnected", servers=state.servers)
        refresh_tls()

    def refresh_tls() -> None:
        """Reconnect with the certificate files as they are now: a renewed client certificate or CA
        bundle (cert-manager rotation) is used without a restart."""
        if auth.uses_tls:
            try:
                nc.options["tls"] = auth.ssl_context()
            except NatsConfigError as exc:
                failed(exc)

    async def on_reconnect() -> None:
        nonlocal last_logged, generic_streak
        state.state, state.since, state.attempts, last_logged, generic_streak = "connected", time.time(), 0, None, 0
        state.error_kind = state.error = None
        CONNECTED.set(1)
        log.info("nats.reconnected", url=redact_url(nc.connected_url.geturl() if nc.connected_url else ""))

    async def on_closed() -> None:
        if state.state != "connecting":  # not a failed first attempt being cleaned up
            state.state = "closed"
            CONNECTED.set(0)
            log.info("nats.closed", servers=state.servers)  # a clean shutdown logs nothing above info

    while True:
        nc = NATS()
        attempt_errors.clear()
        remaining = None if deadline is None else max(deadline - loop.time(), 0.05)
        try:
            options = auth.options(name)
            # Reconnecting is switched on once connected: a first connect that fails raises here,
            # so every cause goes through `failed` (one line per cause) and our backoff.
            await asyncio.wait_for(
                nc.connect(
                    servers=servers,
                    name=name,
                    # nats-py annotates an int; it is a float of seconds (asyncio.wait_for)
                    connect_timeout=connect_timeout if remaining is None else min(connect_timeout, remaining),  # type: ignore[arg-type]
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # nats-py: each server tried (twice) once, then NoServersError
                    reconnect_time_wait=0,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    closed_cb=on_closed,
                    pending_size=64 * 1024 * 1024,
                    **options,
                ),
                remaining,
            )
            nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1)
            state.state, state.since = "connected", time.time()
            state.error_kind = state.error = None
            CONNECTED.set(1)
            log.info(
                "nats.connected",
                url=redact_url(nc.connected_url.geturl() if nc.connected_url else url),
                servers=state.servers,
                auth=state.auth,
                tls=state.tls,
                attempts=state.attempts + 1,
            )
            state.attempts = 0
            return nc
        except asyncio.CancelledError:
            await _quiet_close(nc)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server is retried
            await _quiet_close(nc)
            kind, reason = failed(exc, getattr(nc, "_server_info", None))
            if deadline is not None and loop.time() >= deadline - 0.01:
                where = ", ".join(_without_userinfo(s) for s in servers)
                if kind in OPERATOR_KINDS:
                    raise NatsUnreachable(f"cannot connect to NATS at {where}: {reason}") from None
                raise NatsUnreachable(f"cannot reach NATS at {where} within {max_wait_s:g} s ({reason})") from None
            # Wrong credentials or certificates do not fix themselves quickly: back off further.
            cap = 30.0 if kind in OPERATOR_KINDS else 5.0
            pause = delay + random.random() * delay * 0.2
            if deadline is not None:
                pause = min(pause, max(deadline - loop.time(), 0.0))
            await asyncio.sleep(pause)
            delay = min(delay * 2, cap)


def _without_userinfo(server: str) -> str:
    """A server URL fit for a one-line error message: credentials in it are dropped, not masked."""
    scheme, sep, rest = server.rpartition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}{sep}{host}" if sep else host


async def _quiet_close(nc: NATS) -> None:
    """Release a client whose first connect failed. Its socket is closed directly: nats-py's close()
    waits for a TLS transport whose handshake failed to finish closing, which can take forever, and
    nothing else was started (no read loop, no flusher) before the failure."""
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):  # already gone
            transport.close()


KV_MAX_BYTES = 1 << 30
BOOKINGS_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class StreamSettings:
    kv_max_age_s: float = 3600.0
    bookings_max_age_s: float = 600.0
    replicas: int = 1
    duplicate_window_s: float = 120.0
    kv_max_bytes: int = KV_MAX_BYTES  # <= 0: no byte limit
    bookings_max_bytes: int = BOOKINGS_MAX_BYTES


def _max_bytes(value: int) -> int:
    return value if value > 0 else -1


def stream_configs(names: Names, settings: StreamSettings) -> list[StreamConfig]:
    """KVR_KV discards the *oldest* events when full: every replica has applied them already and the
    indexer's snapshots carry their effect; a replica that would need them to restore is told
    (`history_lost`). KVR_BOOKINGS refuses *new* bookings when full: it is the only copy of the
    replicated load (no snapshot), so dropping old adds would silently under-count load on every
    replica that starts later; a refused publish is an explicit `overloaded` instead. Sizing:
    docs/deploy.md, "Retention and stream limits"."""

    def stream(name: str, subjects: list[str], max_age: float, max_bytes: int, discard: DiscardPolicy) -> StreamConfig:
        return StreamConfig(
            name=name, subjects=subjects, max_age=max_age, max_bytes=_max_bytes(max_bytes), discard=discard,
            storage=StorageType.FILE, retention=RetentionPolicy.LIMITS, num_replicas=settings.replicas,
            duplicate_window=settings.duplicate_window_s,
        )

    return [
        stream(names.kv_stream, names.kv_stream_subjects(), settings.kv_max_age_s, settings.kv_max_bytes, DiscardPolicy.OLD),
        stream(
            names.bookings_stream, names.bookings_stream_subjects(), settings.bookings_max_age_s, settings.bookings_max_bytes,
            DiscardPolicy.NEW,
        ),
    ]


def _differences(want: StreamConfig, have: StreamConfig) -> list[str]:
    diffs = []
    if sorted(want.subjects or []) != sorted(have.subjects or []):
        diffs.append(f"subjects: want {want.subjects}, have {have.subjects}")
    w_bytes, h_bytes = _max_bytes(want.max_bytes or -1), _max_bytes(have.max_bytes or -1)
    if w_bytes != h_bytes:
        diffs.append(f"max_bytes: want {w_bytes}, have {h_bytes}")
    for attr in ("storage", "retention", "discard", "num_replicas"):
        w, h = getattr(want, attr), getattr(have, attr)
        if w is not None and w != h:
            diffs.append(f"{attr}: want {getattr(w, 'value', w)}, have {getattr(h, 'value', h)}")
    for attr in ("max_age", "duplicate_window"):
        w, h = float(getattr(want, attr) or 0), float(getattr(have, attr) or 0)
        if abs(w - h) > 1e-3:
            diffs.append(f"{attr}: want {w:g}s, have {h:g}s")
    return diffs


async def ensure_stream(js: JetStreamContext, want: StreamConfig) -> str:
    """Create the stream if missing; same config → no-op; conflicting config → ProvisioningError."""
    try:
        info = await js.stream_info(want.name)  # type: ignore[arg-type]
    except NotFoundError:
        try:
            await js.add_stream(want)
            log.info("provision.stream_created", stream=want.name, subjects=want.subjects)
            return "created"
        except Exception:  # noqa: BLE001 - a concurrent creator may have won; fall through to compare
            info = await js.stream_info(want.name)  # type: ignore[arg-type]
    diffs = _differences(want, info.config)
    if diffs:
        raise ProvisioningError(f"stream {want.name} exists with a conflicting configuration: " + "; ".join(diffs))
    return "exists"


async def ensure_workers_bucket(js: JetStreamContext, bucket: str, replicas: int = 1) -> str:
    try:
        kv = await js.key_value(bucket)
        status = await kv.status()
        history = status.history
        if history != 1:
            raise ProvisioningError(f"KV bucket {bucket} exists with history {history}, want 1")
        return "exists"
    except BucketNotFoundError:
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas))
        log.info("provision.bucket_created", bucket=bucket)
        return "created"


async def ensure_object_store(js: JetStreamContext, bucket: str, replicas: int = 1) -> str:
    try:
        await js.object_store(bucket)
        return "exists"
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(bucket, ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas))
        log.info("provision.object_store_created", bucket=bucket)
        return "created"


async def provision(js: JetStreamContext, names: Names, settings: StreamSettings) -> dict[str, str]:
    """Idempotently create everything of docs/protocol.md §1; returns name → created/exists."""
    result: dict[str, str] = {}
    for cfg in stream_configs(names, settings):
        result[cfg.name] = await ensure_stream(js, cfg)  # type: ignore[index]
    result[names.workers_bucket] = await ensure_workers_bucket(js, names.workers_bucket, settings.replicas)
    result[names.snapshots_bucket] = await ensure_object_store(js, names.snapshots_bucket, settings.replicas)
    return result


__all__ = [
    "NATS", "ConnectionState", "NatsAuth", "NatsUnreachable", "ProvisioningError", "StreamSettings", "connect", "describe_failure",
    "ensure_stream", "provision", "stream_configs", "nats",
]
