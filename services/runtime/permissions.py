"""Least privilege on NATS: the one table of which subjects each kvr role may publish and subscribe.

Every identity gets exactly what its code does, derived from the same `Names` the services use:
core subjects (requests it answers or sends), JetStream data subjects (events and bookings it
publishes, KV keys and snapshot objects it writes) and the JetStream API subjects behind each client
call (`$JS.API.STREAM.INFO.<stream>` for `stream_info` / `key_value` / `object_store`,
`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` for a pull consumer whose filter is in the subject,
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>` for its fetches, `$JS.FC.<stream>.>` for the flow-control
replies of ordered push consumers, ...). Replies and JetStream deliveries arrive on inboxes: every
role subscribes only to its own inbox prefix (`_INBOX.<role>`, see `natsauth.inbox_prefix_for`), so
no identity can read the replies meant for another.

The table feeds the nats-server configuration (`kvr nats-config`, the Helm values in
`deploy/k8s/nats/`), the tests (tests/security start a server with it) and docs/security.md.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.subjects import Names

from .natsauth import inbox_prefix_for

API = "$JS.API"
ACCOUNT = "KVR"

ROLES: dict[str, str] = {
    "relay": "`kvr relay` beside one engine (or a Dynamo-style publisher): KV events and the discovery record of its pool",
    "indexer": "`kvr indexer`: folds KVR_KV, answers indexer.match / indexer.dump, writes snapshots",
    "scheduler": "`kvr scheduler`: folds KVR_KV (own index replica) and KVR_BOOKINGS, publishes bookings, answers scheduler.*",
    "epp-bridge": "`kvr epp-bridge`: answers epp.query / epp.cleanup, asks scheduler.*",
    "gateway": "the gateway's endpoint-picker plugin and `kvr epp`: asks epp.query / epp.cleanup",
    "operator": "people and dashboards (`nats` CLI, `kvr` tools): read-only — stream state, dumps, scheduler state",
    "provisioner": "`kvr provision` (a Job): creates and updates the streams, the buckets and the object store",
    "mock-workers": "`kvr mock-workers` (development): a simulated fleet, a relay plus the generate endpoint and load reports",
    "replay": "`kvr replay` (development): drives mock workers through the gateway path",
}
# Inbox prefixes besides the role's own (`_INBOX.<role>`): commands that act as that role.
EXTRA_INBOXES: dict[str, tuple[str, ...]] = {"gateway": ("epp",), "provisioner": ("provision",)}


@dataclass(frozen=True)
class Grant:
    op: Literal["pub", "sub"]
    subject: str
    why: str


@dataclass(frozen=True)
class RolePermissions:
    role: str
    user: str
    grants: tuple[Grant, ...]
    allow_responses: bool = False

    def subjects(self, op: Literal["pub", "sub"]) -> list[str]:
        return list(dict.fromkeys(g.subject for g in self.grants if g.op == op))

    def server_permissions(self) -> dict[str, Any]:
        out: dict[str, Any] = {"publish": {"allow": self.subjects("pub")}, "subscribe": {"allow": self.subjects("sub")}}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


@dataclass(frozen=True)
class Scope:
    """What the permissions are scoped to: the names, the pools served, optional finer bindings."""

    names: Names = field(default_factory=Names)
    pools: tuple[str, ...] = ("default",)
    relay_bucket: str = "KVR_RELAY"
    relay_worker_id: int | None = None  # bind a relay user to one worker (its pod's id)
    router_id: str | None = None  # bind a scheduler user to its own bookings subject
    embedded_scheduler: bool = False  # the bridge runs the scheduler in process (--epp-embedded-scheduler)

    def streams(self) -> dict[str, str]:
        n = self.names
        return {
            "kv": n.kv_stream,
            "bookings": n.bookings_stream,
            "workers": f"KV_{n.workers_bucket}",
            "snapshots": f"OBJ_{n.snapshots_bucket}",
            "relay": f"KV_{self.relay_bucket}",
        }


# ---- building blocks: one per client call the code makes ------------------------------------------


def _inbox(role: str) -> list[Grant]:
    prefixes = [inbox_prefix_for(role), *(inbox_prefix_for(extra) for extra in EXTRA_INBOXES.get(role, ()))]
    return [Grant("sub", f"{p}.>", "replies and JetStream deliveries (own inbox prefix only)") for p in prefixes]


def _info(streams: Iterable[str]) -> list[Grant]:
    return [
        Grant("pub", f"{API}.STREAM.INFO.{s}", "stream_info / key_value / object_store (provisioning check, lag)")
        for s in streams
    ]


def _pull_reader(stream: str, filters: Sequence[str]) -> list[Grant]:
    """`StreamFollower`: a pull consumer per (re)start, filtered to the pools served."""
    if len(filters) == 1:
        # nats-py puts a single filter in the API subject: the server refuses any other filter.
        create = [Grant("pub", f"{API}.CONSUMER.CREATE.{stream}.*.{filters[0]}", "pull consumer on the served pool")]
    else:
        # Several filters travel in the request body only; the subject cannot pin them.
        create = [Grant("pub", f"{API}.CONSUMER.CREATE.{stream}.*", "pull consumer on the served pools (several filters)")]
    return [
        *create,
        Grant("pub", f"{API}.CONSUMER.MSG.NEXT.{stream}.*", "fetch from its pull consumer"),
        Grant("pub", f"{API}.CONSUMER.INFO.{stream}.*", "its consumer's pending count (caught up, readiness)"),
        Grant("pub", f"{API}.CONSUMER.DELETE.{stream}.*", "delete its consumer when it restarts or stops"),
    ]


def _ordered_reader(stream: str, why: str) -> list[Grant]:
    """An ordered push consumer (nats-py names none, so the API subject carries no filter)."""
    return [
        Grant("pub", f"{API}.CONSUMER.CREATE.{stream}", why),
        Grant("pub", f"$JS.FC.{stream}.>", "flow-control replies of the ordered consumer"),
    ]


def _kv_reader(scope: Scope) -> list[Grant]:
    n = scope.names
    filters = [f"$KV.{n.workers_bucket}.{p}.>" for p in scope.pools]
    return _pull_reader(scope.streams()["workers"], filters)


def _kv_expiry(scope: Scope) -> list[Grant]:
    n = scope.names
    return [
        Grant("pub", f"$KV.{n.workers_bucket}.{p}.*", "delete the discovery key of an expired worker (guarded by revision)")
        for p in scope.pools
    ]


def _kv_events_reader(scope: Scope) -> list[Grant]:
    n = scope.names
    return [
        *_pull_reader(n.kv_stream, [n.kv_filter(p) for p in scope.pools]),
        Grant("pub", f"{API}.STREAM.MSG.GET.{n.kv_stream}", "an unknown worker's first event (backfill probe when its record appears)"),
    ]


def _snapshot_reader(scope: Scope) -> list[Grant]:
    obj = scope.streams()["snapshots"]
    return [
        Grant("pub", f"{API}.STREAM.MSG.GET.{obj}", "read a snapshot's metadata (object store get)"),
        Grant("pub", f"{API}.STREAM.NAMES", "object store get looks its stream up by the chunk subject (names only)"),
        *_ordered_reader(obj, "read a snapshot's chunks (object store get)"),
    ]


def _snapshot_writer(scope: Scope) -> list[Grant]:
    n = scope.names
    obj = scope.streams()["snapshots"]
    grants = [Grant("pub", f"$O.{n.snapshots_bucket}.C.>", "snapshot chunks (random object ids)")]
    for p in scope.pools:
        meta = base64.urlsafe_b64encode(n.snapshot_object(p).encode()).decode()
        grants.append(Grant("pub", f"$O.{n.snapshots_bucket}.M.{meta}", f"metadata of the pool's snapshot object {n.snapshot_object(p)}"))
    grants.append(Grant("pub", f"{API}.STREAM.PURGE.{obj}", "drop the chunks of the replaced snapshot"))
    return grants


def _serve(subjects: Iterable[str], why: str) -> list[Grant]:
    return [Grant("sub", s, why) for s in subjects]


def _ask(subjects: Iterable[str], why: str) -> list[Grant]:
    return [Grant("pub", s, why) for s in subjects]


# ---- the roles ----------------------------------------------------------------------------------


def role_permissions(role: str, scope: Scope | None = None) -> RolePermissions:
    scope = scope or Scope()
    n, pools, streams = scope.names, scope.pools, scope.streams()
    every_stream = [streams[k] for k in ("kv", "bookings", "workers", "snapshots")]
    grants: list[Grant] = _inbox(role)
    responses = False
    if role == "relay":
        if len(pools) != 1:
            raise ValueError("a relay identity serves exactly one pool")
        pool = pools[0]
        wid = "*" if scope.relay_worker_id is None else str(scope.relay_worker_id)
        grants += _info([*every_stream, streams["relay"]])
        grants += [
            Grant("pub", f"{n.prefix}.{pool}.kv.{wid}.*", "KV events of its worker (every dp rank)"),
            Grant("pub", f"$KV.{n.workers_bucket}.{pool}.{wid}", "its discovery record: put, heartbeat, delete at stop"),
            Grant("pub", f"$KV.{scope.relay_bucket}.{pool}.{wid}.*", "its per-rank event-id high-water marks"),
            Grant("pub", f"{API}.STREAM.MSG.GET.{streams['relay']}", "read its high-water marks at start"),
        ]
    elif role == "indexer":
        grants += _info(every_stream)
        grants += _kv_events_reader(scope) + _kv_reader(scope) + _kv_expiry(scope)
        grants += _snapshot_reader(scope) + _snapshot_writer(scope)
        grants += _serve([n.match(p) for p in pools] + [n.dump(p) for p in pools], "answers indexer.match / indexer.dump")
        responses = True
    elif role == "scheduler":
        grants += _scheduler(scope, every_stream)
        responses = True
    elif role == "epp-bridge":
        grants += _info(every_stream)
        grants += _kv_reader(scope)
        grants += _serve([n.epp_query(p) for p in pools] + [n.epp_book(p) for p in pools] + [n.epp_cleanup(p) for p in pools],
                         "answers epp.query / epp.book / epp.cleanup")
        if scope.embedded_scheduler:
            grants += _scheduler(scope, every_stream)
        else:
            grants += _ask([n.select(p) for p in pools] + [n.booking(p) for p in pools], "asks scheduler.select / scheduler.booking")
        responses = True
    elif role == "gateway":
        grants += _ask([n.epp_query(p) for p in pools] + [n.epp_book(p) for p in pools] + [n.epp_cleanup(p) for p in pools],
                       "asks epp.query / epp.book / epp.cleanup")
    elif role == "operator":
        grants += _info([*every_stream, streams["relay"]])
        grants += [Grant("pub", f"{API}.INFO", "account usage"), Grant("pub", f"{API}.STREAM.NAMES", "list streams"),
                   Grant("pub", f"{API}.STREAM.LIST", "list streams with state")]
        for s in every_stream:
            grants += [
                Grant("pub", f"{API}.CONSUMER.INFO.{s}.*", "consumer lag"),
                Grant("pub", f"{API}.CONSUMER.LIST.{s}", "consumers"),
                Grant("pub", f"{API}.STREAM.MSG.GET.{s}", "read one message / KV key"),
                Grant("pub", f"{API}.CONSUMER.CREATE.{s}", "read the stream (ordered consumer, e.g. `nats stream view`)"),
                Grant("pub", f"{API}.CONSUMER.CREATE.{s}.>", "read the stream (named consumer)"),
                Grant("pub", f"{API}.CONSUMER.MSG.NEXT.{s}.*", "fetch from its consumer"),
                Grant("pub", f"$JS.FC.{s}.>", "flow-control replies of its ordered consumer"),
            ]
        grants += _ask(
            [n.dump(p) for p in pools] + [n.match(p) for p in pools] + [f"{n.scheduler_state(p)}" for p in pools]
            + [f"{n.scheduler_state(p)}.*" for p in pools],
            "indexer.dump / indexer.match / scheduler.state (read-only endpoints)",
        )
    elif role == "provisioner":
        for s in [*every_stream, streams["relay"]]:
            grants += [
                Grant("pub", f"{API}.STREAM.INFO.{s}", "compare an existing stream with the wanted configuration"),
                Grant("pub", f"{API}.STREAM.CREATE.{s}", "create it when missing"),
                Grant("pub", f"{API}.STREAM.UPDATE.{s}", "apply a changed limit"),
            ]
    elif role == "mock-workers":
        grants += _info(every_stream)
        for pool in pools:
            grants += [
                Grant("pub", f"{n.prefix}.{pool}.kv.*.*", "KV events of the simulated workers"),
                Grant("pub", f"$KV.{n.workers_bucket}.{pool}.*", "discovery records of the simulated workers"),
                Grant("pub", n.load_subject(pool, "*"), "load reports"),
                Grant("sub", f"{n.prefix}.{pool}.worker.*.generate", "generate requests"),
            ]
        grants.append(Grant("pub", "_INBOX.>", "streamed generate progress to the requester's inbox (several replies)"))
    elif role == "replay":
        grants += _info(every_stream)
        grants += _ask([n.epp_query(p) for p in pools] + [n.epp_book(p) for p in pools] + [n.epp_cleanup(p) for p in pools],
                       "asks epp.query / epp.book / epp.cleanup")
        grants += _ask([f"{n.prefix}.{p}.worker.*.generate" for p in pools], "sends generate to the chosen mock worker")
        grants += _ask([n.scheduler_state(p) for p in pools], "reads the schedulers' load view for its report")
    else:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return RolePermissions(role, user_name(role, scope), tuple(grants), responses)


def _scheduler(scope: Scope, every_stream: list[str]) -> list[Grant]:
    n, pools, streams = scope.names, scope.pools, scope.streams()
    router = scope.router_id or "*"
    grants = _info(every_stream)
    grants += _kv_events_reader(scope) + _snapshot_reader(scope)  # its own index replica
    grants += _kv_reader(scope) + _kv_expiry(scope)
    grants += _ordered_reader(streams["bookings"], "replay and follow every booking (push feed)")
    grants += _pull_reader(streams["bookings"], [n.bookings_filter("*")])  # --bookings-feed pull
    grants += [Grant("pub", n.bookings_subject(p, router), "its bookings (add / prefill_complete / free)") for p in pools]
    grants += _serve(
        [n.select(p) for p in pools] + [n.booking(p) for p in pools]
        + [n.scheduler_state(p) for p in pools] + [f"{n.scheduler_state(p)}.{router}" for p in pools],
        "answers scheduler.select / scheduler.booking / scheduler.state",
    )
    grants += _serve([n.load_subject(p, "*") for p in pools], "workers' load reports (busy thresholds)")
    return grants


def user_name(role: str, scope: Scope) -> str:
    if role == "relay":
        suffix = f"-{scope.relay_worker_id}" if scope.relay_worker_id is not None else ""
        return f"kvr-relay-{scope.pools[0]}{suffix}"
    return f"kvr-{role}"


# ---- the server configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A value written unquoted in the server config, e.g. an environment reference `$KVR_…`."""

    text: str


@dataclass(frozen=True)
class User:
    permissions: RolePermissions
    password: str | Raw | None = None
    nkey: str | None = None  # public NKEY (U...): no secret in the config at all

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nkey:
            out["nkey"] = self.nkey
        else:
            out["user"] = self.permissions.user
            out["password"] = self.password
        out["permissions"] = self.permissions.server_permissions()
        return out


def default_identities(pools: Sequence[str]) -> list[tuple[str, Scope]]:
    """One identity per role, and one relay identity per pool."""
    out = [(role, Scope(pools=tuple(pools))) for role in ROLES if role not in ("relay", "mock-workers", "replay")]
    out += [("relay", Scope(pools=(pool,))) for pool in pools]
    return out


def password_env(user: str) -> str:
    """The environment variable that carries a user's password into nats-server (from a Secret); not a
    kvr setting, hence no KVR_ prefix."""
    return "PASSWORD_" + user.upper().replace("-", "_")


def accounts_config(users: Sequence[User], *, account: str = ACCOUNT) -> dict[str, Any]:
    return {account: {"jetstream": Raw("enabled"), "users": [u.entry() for u in users]}}


def render_conf(value: Any, indent: int = 0) -> str:
    """NATS server configuration syntax (keys bare, strings JSON-quoted, `Raw` unquoted)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = ["{"]
        for key, item in value.items():
            lines.append(f"{pad}  {key}: {render_conf(item, indent + 1)}")
        lines.append(f"{pad}}}")
        return "\n".join(lines)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return "[" + ", ".join(json.dumps(v) for v in value) + "]"
        return "[\n" + "\n".join(f"{pad}  {render_conf(v, indent + 1)}" for v in value) + f"\n{pad}]"
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def helm_value(value: Any) -> Any:
    """The same structure for the official chart's `config.merge` (`<< $VAR >>` stays unquoted)."""
    if isinstance(value, dict):
        return {k: helm_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [helm_value(v) for v in value]
    if isinstance(value, Raw):
        return f"<< {value.text} >>"
    return value


def markdown_table(pools: Sequence[str] = ("default",), names: Names | None = None) -> str:
    """The role/subject table of docs/security.md (a test keeps it identical)."""
    names = names or Names()
    lines = ["| role (user) | publish | subscribe | why |", "|---|---|---|---|"]
    for role, scope in default_identities(pools):
        scope = Scope(names=names, pools=scope.pools)
        perms = role_permissions(role, scope)
        first = True
        for grant in perms.grants:
            pub = f"`{grant.subject}`" if grant.op == "pub" else ""
            sub = f"`{grant.subject}`" if grant.op == "sub" else ""
            who = f"**{role}** (`{perms.user}`)" + (", replies allowed" if perms.allow_responses else "") if first else ""
            lines.append(f"| {who} | {pub} | {sub} | {grant.why} |")
            first = False
    return "\n".join(lines) + "\n"
