"""Hostile input and overload, measured: fuzzed requests to every endpoint, fuzzed stream messages,
a backlog of large KV messages, and a flood of KV events from workers nobody registered.

    .venv/bin/python bench/hostile_input.py                      # everything, the issue's sizes
    .venv/bin/python bench/hostile_input.py --only fuzz --fuzz-requests 10000 --fuzz-messages 20000
    .venv/bin/python bench/hostile_input.py --only backlog --backlog-messages 200 --backlog-blocks 8192
    .venv/bin/python bench/hostile_input.py --only flood --flood-workers 1000 --flood-blocks 2000000

Prints a table and writes bench/results/hostile_input.json. The short versions of the same
scenarios run in `make test` (tests/fuzz/, tests/runtime/test_follower.py, tests/indexer/test_hostile.py);
this module is also their harness (the request/message generator and the in-process stack).

- fuzz: one in-process indexer, scheduler (own index replica) and EPP bridge on a real nats-server.
  Every endpoint gets `--fuzz-requests` inputs from a seeded generator (random bytes, invalid UTF-8,
  ~1,000-deep and deeper nesting, wrong types, out-of-range and oversized numbers, truncated JSON,
  msgpack variants, unknown fields). Counted: replies by code, requests without a reply, `internal`,
  and state changes after a rejected request (bookings stream position, scheduler load digest,
  index version). Then `--fuzz-messages` malformed KV / discovery / bookings messages: each must
  be counted by the service that reads it, and no apply callback may raise (a traceback).
- backlog: `kvr indexer` as a process; `--backlog-messages` stored events of `--backlog-blocks`
  blocks each wait in KVR_KV before it starts. Measured: time until /readyz is 200, whether it was
  200 before every message was applied, slow-consumer disconnects (server /varz), resets.
- flood: `kvr indexer` and `kvr scheduler` (own index replica) as processes; `--flood-workers`
  unregistered worker ids publish `--flood-blocks` blocks in total. Measured: RSS before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
import nats
import nats.errors

from schemas import codec
from schemas.bookings import BookingEvent
from schemas.discovery import WorkerRecord
from schemas.events import RouterEvent, kv_msg_id, stored_event
from schemas.subjects import Names
from services.indexer.admission import binding_error, parse_kv_subject
from services.runtime.config import Config, ServiceConfig
from services.runtime.embedded import NatsServer
from services.runtime.logs import setup_logging
from services.runtime.natsio import provision
from services.runtime.procs import ServiceProcess
from services.runtime.service import Runtime, stream_settings
from services.runtime.workers import now_ms, parse_key, put_worker

RESULTS = Path(__file__).parent / "results"
NAMES = Names()
POOL = "p"

# ---- the generator ----------------------------------------------------------------------------

SEEDS: dict[str, list[dict[str, Any]]] = {
    "scheduler.select": [
        {"request_id": "s-1", "token_ids": list(range(1, 40)), "book": False},
        {"request_id": "s-2", "block_hashes": [11, 12, 13], "isl_tokens": 40, "mode": "aggregated",
         "routing_constraints": {"required_taints": [], "preferred_taints": {"gpu": 0.5}},
         "overrides": {"temperature": 0.0, "overlap_score_credit": 1.0}, "allowed_worker_ids": [1, 2], "book": True},
        {"request_id": "s-3", "token_ids": [5, 6, 7, 8], "lora_name": "a", "cache_salt": "x", "pinned_worker_id": 1,
         "pinned_dp_rank": 0, "policy": "round_robin", "expected_output_tokens": 20, "priority": 3, "book": False},
    ],
    "scheduler.booking": [{"request_id": "s-2", "phase": "free"}, {"request_id": "nope", "phase": "prefill_complete"}],
    "scheduler.state": [{}],
    "indexer.match": [{"block_hashes": [11, 12, 13]}, {"token_ids": [1, 2, 3, 4], "lora_name": "a", "early_exit": True}],
    "indexer.dump": [{}],
    "epp.query": [
        {"request_id": "q-1", "body": {"model": "m", "prompt": [1, 2, 3, 4, 5, 6, 7, 8]}, "book": False},
        {"request_id": "q-2", "body": {"messages": [{"role": "user", "content": "hi"}], "nvext": {"token_data": [1, 2, 3, 4]}},
         "pods": [{"name": "vllm-1", "address": "10.0.0.1", "port": 8000}], "book": True, "mode": "auto"},
    ],
    "epp.cleanup": [{"request_id": "q-2", "phase": "free"}, {"request_id": "q-9", "phase": "prefill_complete"}],
}

RAW = "\u0001RAW\u0001"  # a string placeholder replaced by a raw JSON literal after encoding
RAW_LITERALS = [
    "1e400", "-1e400", "NaN", "Infinity", "-0", "1.5", "0.0000001", "9" * 30, "-" + "9" * 30, "1" * 5000,
    "18446744073709551616", "9223372036854775808", "-9223372036854775809", '"\\ud800"', '"\\udfff\\ud800"',
    '"\\u0000"', "true", "null", '"' + "x" * 300 + '"', "[" * 600 + "]" * 600, "{}",
]
WEIRD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, 2**31, 2**53, 2**63 - 1, 2**64 - 1, -(2**63), "", "x" * 5000, "\x00", "é" * 10,
    [], {}, [None] * 5, {"a": 1}, list(range(2000)), "NaN", [[[[[]]]]], {"": {"": {"": None}}},
]
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc3", b"\x80"]


def _weird(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(WEIRD_VALUES))  # a fresh copy: later mutations must not reach the table


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    cur = obj
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return obj


def _deep(depth: int, rng: random.Random) -> Any:
    inner: Any = 1
    for _ in range(depth):
        inner = [inner] if rng.random() < 0.5 else {"a": inner}
    return inner


class Mutator:
    """Seeded stream of hostile payloads derived from valid seed messages: (data, headers, kind)."""

    KINDS = (
        "random_bytes", "invalid_utf8", "deep_field", "deep_whole", "weird_value", "raw_number", "drop_field",
        "extra_field", "truncated", "msgpack", "msgpack_garbage", "msgpack_bad_utf8", "root_type", "empty",
    )

    def __init__(self, seeds: list[Any], seed: int) -> None:
        self.seeds = seeds
        self.rng = random.Random(seed)

    def _seed(self) -> Any:
        return msgspec.json.decode(msgspec.json.encode(self.rng.choice(self.seeds)))

    def next(self) -> tuple[bytes, dict[str, str] | None, str]:
        rng = self.rng
        kind = rng.choice(self.KINDS)
        obj = self._seed()
        paths = _paths(obj)
        mp = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK}
        if kind == "random_bytes":
            return rng.randbytes(rng.randint(1, 300)), rng.choice([None, mp]), kind
        if kind == "invalid_utf8":
            strings = [p for p in paths if p and isinstance(_get(obj, p), str)] or [()]
            path = rng.choice(strings)
            _set(obj, path, "\u0002BAD\u0002") if path else None
            data = msgspec.json.encode(obj)
            bad = rng.choice(BAD_UTF8)
            data = data.replace("\u0002BAD\u0002".encode(), b"a" + bad + b"b", 1) if path else data + bad
            return data, None, kind
        if kind == "deep_field":
            depth = rng.choice([100, 900, 1000, 1500, 5000])
            path = rng.choice(paths)
            data = msgspec.json.encode(_set(obj, path, _deep(depth, rng))) if depth < 900 else _deep_text(obj, path, depth)
            return data, None, kind
        if kind == "deep_whole":
            depth = rng.choice([1000, 3000, 20000])
            return b"[" * depth + msgspec.json.encode(obj) + b"]" * depth, None, kind
        if kind == "weird_value":
            for _ in range(rng.randint(1, 3)):
                obj = _set(obj, rng.choice(_paths(obj)), _weird(rng)) if isinstance(obj, (dict, list)) else obj
            return msgspec.json.encode(obj), None, kind
        if kind == "raw_number":
            path = rng.choice(paths)
            data = msgspec.json.encode(_set(obj, path, RAW))
            return data.replace(msgspec.json.encode(RAW), rng.choice(RAW_LITERALS).encode(), 1), None, kind
        if kind == "drop_field":
            keyed = [p for p in paths if p and isinstance(p[-1], str)]
            if keyed:
                path = rng.choice(keyed)
                parent = _get(obj, path[:-1])
                parent.pop(path[-1], None)
            return msgspec.json.encode(obj), None, kind
        if kind == "extra_field":
            dicts = [p for p in paths if isinstance(_get(obj, p), dict)] or [()]
            target = _get(obj, rng.choice(dicts))
            if isinstance(target, dict):
                target[rng.choice(["x", "status", "__proto__", "a" * 300])] = _weird(rng)
            return msgspec.json.encode(obj), None, kind
        if kind == "truncated":
            data = msgspec.json.encode(obj)
            return data[: rng.randint(0, max(0, len(data) - 1))], None, kind
        if kind == "msgpack":
            obj = _set(obj, rng.choice(paths), _weird(rng)) if paths else obj
            return msgspec.msgpack.encode(obj), mp, kind
        if kind == "msgpack_garbage":
            return bytes([rng.choice([0xC1, 0xDD, 0xDF, 0x9F, 0xDB, 0xC6])]) + rng.randbytes(rng.randint(0, 40)), mp, kind
        if kind == "msgpack_bad_utf8":
            # a map {"request_id": <str with invalid UTF-8>} in raw msgpack
            bad = rng.choice(BAD_UTF8)
            return b"\x81\xaarequest_id" + bytes([0xA0 | len(bad)]) + bad, mp, kind
        if kind == "root_type":
            return rng.choice([b"null", b"1", b'"x"', b"[]", b"true", b"[{}]", b"1e999"]), None, kind
        return b"", rng.choice([None, mp]), kind


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _deep_text(obj: Any, path: tuple, depth: int) -> bytes:
    """Nesting deeper than the encoder's own recursion allows: built as text."""
    data = msgspec.json.encode(_set(obj, path, RAW))
    return data.replace(msgspec.json.encode(RAW), b"[" * depth + b"1" + b"]" * depth, 1)


# ---- the in-process stack -----------------------------------------------------------------------


C = TypeVar("C", bound=Config)


def _cfg(cls: type[C], nats_url: str, *argv: str) -> C:
    return cls.from_argv(["--nats-url", nats_url, "--pool", POOL, *argv], env={})


@dataclass
class Stack:
    """Indexer (endpoints), scheduler (own index replica) and EPP bridge in this process."""

    nc: Any
    indexer: Any
    scheduler: Any
    bridge: Any
    subjects: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def start(cls, nats_url: str) -> Stack:
        from services.epp_bridge.app import EppBridgeApp
        from services.epp_bridge.settings import EppBridgeConfig
        from services.indexer.app import IndexerApp
        from services.indexer.settings import IndexerConfig
        from services.scheduler.app import SchedulerApp
        from services.scheduler.settings import SchedulerConfig

        nc = await nats.connect(nats_url, max_reconnect_attempts=-1)
        js = nc.jetstream()
        base = _cfg(ServiceConfig, nats_url)
        await provision(js, NAMES, stream_settings(base))
        for wid in (1, 2):
            rec = WorkerRecord(worker_id=wid, pool=POOL, pod_name=f"vllm-{wid}", address=f"10.0.0.{wid}", port=8000,
                               block_size=4, total_kv_blocks=1000, ttl_s=3600, heartbeat_ms=now_ms())
            await put_worker(nc, NAMES.workers_bucket, rec)
        for wid in (1, 2):
            ev = stored_event(wid, 0, [(wid * 1000 + i, 11 + i) for i in range(3)])
            await js.publish(NAMES.kv_subject(POOL, wid, 0), codec.encode_json(ev), headers={"Nats-Msg-Id": kv_msg_id(POOL, wid, 0, 0)})
        icfg = _cfg(IndexerConfig, nats_url, "--snapshot-every-events", "0", "--snapshot-interval-s", "0")
        indexer = IndexerApp(icfg)
        await indexer.start(Runtime("indexer", icfg, nc))
        # Bookings of accepted requests must not expire while the fuzz runs: the state check compares
        # the load view before and after each rejected request, and an expiry in between is not its doing.
        scfg = _cfg(SchedulerConfig, nats_url,
                    "--router-id", "fuzz", "--snapshot-every-events", "0", "--snapshot-interval-s", "0",
                    "--booking-ttl-s", "86400", "--booking-unconfirmed-ttl-s", "86400")
        scheduler = SchedulerApp(scfg)
        await scheduler.start(Runtime("scheduler", scfg, nc))
        bcfg = _cfg(EppBridgeConfig, nats_url)
        bridge = EppBridgeApp(bcfg)
        await bridge.start(Runtime("epp-bridge", bcfg, nc))
        stack = cls(nc, indexer, scheduler, bridge)
        deadline = time.monotonic() + 30
        while not (indexer.ready() and scheduler.ready() and bridge.ready()):
            if time.monotonic() > deadline:
                raise TimeoutError("stack not ready")
            await asyncio.sleep(0.05)
        stack.subjects = {
            "scheduler.select": NAMES.select(POOL),
            "scheduler.booking": NAMES.booking(POOL),
            "scheduler.state": NAMES.scheduler_state(POOL),
            "indexer.match": NAMES.match(POOL),
            "indexer.dump": NAMES.dump(POOL),
            "epp.query": NAMES.epp_query(POOL),
            "epp.cleanup": NAMES.epp_cleanup(POOL),
        }
        return stack

    async def stop(self) -> None:
        for app in (self.bridge, self.scheduler, self.indexer):
            with contextlib.suppress(Exception):
                await app.stop()
        await self.nc.close()

    async def fingerprint(self) -> tuple:
        """Everything a request could change: bookings stream, load view, index, pending compensations."""
        info = await self.nc.jetstream().stream_info(NAMES.bookings_stream)
        tracker = self.scheduler.states[POOL].tracker
        return (
            info.state.last_seq,
            self.scheduler.export_state(POOL).digest,
            len(tracker.by_request),
            self.indexer.index(POOL).version,
            self.scheduler.overlap.replica.index(POOL).version,
            len(self.bridge._background),
        )

    def apply_failures(self) -> int:
        from services.runtime.follower import FOLLOWERS

        return sum(getattr(f, "apply_failures", 0) for f in list(FOLLOWERS))


# ---- fuzzing requests ---------------------------------------------------------------------------


@dataclass
class EndpointResult:
    sent: int = 0
    no_reply: int = 0
    internal: int = 0
    state_changed: int = 0
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "no_reply": self.no_reply, "internal": self.internal, "state_changed": self.state_changed,
            "codes": dict(self.codes), "kinds": dict(self.kinds), "examples": self.examples[:5],
        }


def _reply_status(msg: Any) -> str:
    ctype = codec.content_type_of(msg.headers)
    body = (msgspec.msgpack if codec.is_msgpack(ctype) else msgspec.json).decode(msg.data)
    if not isinstance(body, dict):
        return "unparseable"
    if body.get("status") == "error":
        return str((body.get("error") or {}).get("code", "missing_code"))
    return "ok" if body.get("status") == "ok" else "no_status"


async def fuzz_endpoints(stack: Stack, per_endpoint: int, seed: int, timeout: float = 3.0) -> dict[str, EndpointResult]:
    out: dict[str, EndpointResult] = {}
    for n, (endpoint, subject) in enumerate(sorted(stack.subjects.items())):
        res = out[endpoint] = EndpointResult()
        gen = Mutator(SEEDS[endpoint], seed * 100 + n)
        for _ in range(per_endpoint):
            data, headers, kind = gen.next()
            before = await stack.fingerprint()
            res.sent += 1
            res.kinds[kind] += 1
            try:
                msg = await stack.nc.request(subject, data, timeout=timeout, headers=headers)
            except nats.errors.TimeoutError:
                res.no_reply += 1
                res.examples.append(f"no reply: {kind} {data[:80]!r}")
                continue
            code = _reply_status(msg)
            res.codes[code] += 1
            if code == "internal":
                res.internal += 1
                res.examples.append(f"internal: {kind} {data[:80]!r} → {msg.data[:160]!r}")
            if code != "ok" and await stack.fingerprint() != before:
                res.state_changed += 1
                res.examples.append(f"state changed: {kind} {data[:80]!r} → {code}")
    return out


# ---- fuzzing stream messages ------------------------------------------------------------------


def _kv_malformed(subject: str, data: bytes, headers: dict[str, str] | None) -> bool:
    parsed = parse_kv_subject(subject, NAMES.prefix)
    if parsed is None:
        return True
    try:
        payload: RouterEvent | list[RouterEvent] = codec.decode(data, RouterEvent | list[RouterEvent], codec.content_type_of(headers))
    except codec.SchemaError:
        return True
    events = payload if isinstance(payload, list) else [payload]
    if len(events) > 4096:
        return True
    return binding_error(events, parsed[1], parsed[2]) is not None


def _record_malformed(key: str, data: bytes) -> bool:
    parsed = parse_key(key)
    if parsed is None:
        return True
    try:
        rec: WorkerRecord = codec.decode(data, WorkerRecord)
    except codec.SchemaError:
        return True
    return (rec.pool, rec.worker_id) != parsed


def _booking_malformed(data: bytes) -> bool:
    try:
        codec.decode(data, BookingEvent)
    except codec.SchemaError:
        return True
    return False


KV_SEEDS: list[Any] = [
    msgspec.to_builtins(stored_event(1, 100, [(1100, 11), (1101, 12)])),
    msgspec.to_builtins([stored_event(1, 101, [(1102, 13)])]),
]
RECORD_SEEDS: list[Any] = [msgspec.to_builtins(WorkerRecord(worker_id=7, pool=POOL, total_kv_blocks=10, ttl_s=3600, heartbeat_ms=1))]
BOOKING_SEEDS: list[Any] = [
    {"type": "add", "request_id": "b-1", "router_id": "x", "pool": POOL, "worker_id": 1, "ts_ms": 1, "sequence_hashes": [1, 2]},
    {"type": "free", "request_id": "b-1", "router_id": "x", "pool": POOL},
]
BAD_KV_SUBJECTS = ["kvr.p.kv.01.0", "kvr.p.kv.1", "kvr.p.kv.1.0.0", "kvr.p.kv.x.0", "kvr.p.kv.1.99999", "kvr.p.kv.2.0"]


@dataclass
class StreamResult:
    sent: int = 0
    malformed_expected: int = 0
    malformed_counted: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "malformed_expected": self.malformed_expected, "malformed_counted": self.malformed_counted}


async def fuzz_streams(stack: Stack, per_stream: int, seed: int) -> dict[str, Any]:
    """Malformed KV, discovery and bookings messages; each service must count exactly the malformed ones."""
    from services.scheduler import metrics as sm

    js = stack.nc.jetstream()
    res = {"kv": StreamResult(), "discovery": StreamResult(), "bookings": StreamResult()}
    ist = stack.indexer.pool_states()[POOL]
    replica = stack.scheduler.overlap.replica.pool_states()[POOL]
    kv_before = (ist.malformed, replica.malformed)
    rec_before = (stack.indexer.watcher.invalid_records, stack.scheduler.watcher.invalid_records)
    book_before = sm.BOOKINGS_INVALID._value.get()
    failures_before = stack.apply_failures()
    rng = random.Random(seed)
    kv_gen, rec_gen, book_gen = Mutator(KV_SEEDS, seed + 1), Mutator(RECORD_SEEDS, seed + 2), Mutator(BOOKING_SEEDS, seed + 3)
    last_kv = last_rec = last_book = 0
    for _ in range(per_stream):
        data, headers, _ = kv_gen.next()
        subject = NAMES.kv_subject(POOL, 1, 0) if rng.random() < 0.85 else rng.choice(BAD_KV_SUBJECTS)
        res["kv"].sent += 1
        res["kv"].malformed_expected += _kv_malformed(subject, data, headers)
        last_kv = (await js.publish(subject, data, headers=headers)).seq
        data, headers, _ = rec_gen.next()
        key = f"{POOL}.{rng.choice(['7', '8', '07', 'x', '9' * 30])}"
        res["discovery"].sent += 1
        res["discovery"].malformed_expected += _record_malformed(key, data)
        last_rec = (await js.publish(f"$KV.{NAMES.workers_bucket}.{key}", data)).seq
        data, headers, _ = book_gen.next()
        res["bookings"].sent += 1
        res["bookings"].malformed_expected += _booking_malformed(data)
        last_book = (await js.publish(NAMES.bookings_subject(POOL, "fuzz-peer"), data)).seq
    followers = [(stack.indexer.follower, last_kv), (stack.scheduler.overlap.replica.follower, last_kv),
                 (stack.indexer.watcher.follower, last_rec), (stack.scheduler.watcher.follower, last_rec),
                 (stack.scheduler.follower, last_book)]
    deadline = time.monotonic() + 60
    while any(f.applied_seq < seq for f, seq in followers):
        if time.monotonic() > deadline:
            raise TimeoutError("followers did not reach the fuzzed messages")
        await asyncio.sleep(0.05)
    res["kv"].malformed_counted = ist.malformed - kv_before[0]
    kv_replica = replica.malformed - kv_before[1]
    res["discovery"].malformed_counted = stack.indexer.watcher.invalid_records - rec_before[0]
    rec_scheduler = stack.scheduler.watcher.invalid_records - rec_before[1]
    res["bookings"].malformed_counted = int(sm.BOOKINGS_INVALID._value.get() - book_before)
    return {
        **{k: v.as_dict() for k, v in res.items()},
        "kv_counted_by_scheduler_replica": kv_replica,
        "discovery_counted_by_scheduler": rec_scheduler,
        "apply_failures": stack.apply_failures() - failures_before,
    }


# ---- backlog and flood (service processes) ------------------------------------------------------


def _varz(server: NatsServer) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as resp:
        return json.loads(resp.read())


def _readyz(proc: ServiceProcess) -> dict[str, Any]:
    """/readyz's body plus `_http_status`; only `_error` while it does not answer (not listening yet,
    or too loaded to answer in time: a poll goes on, a final figure records why it is missing)."""
    scrape = proc.scrape("/readyz")
    if not scrape.ok:
        return {"_error": scrape.error}
    try:
        data: dict[str, Any] = json.loads(scrape.body) if scrape.body else {}
    except ValueError as exc:  # a truncated answer
        return {"_error": f"/readyz body: {exc}"}
    return {**data, "_http_status": scrape.status}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _publish_all(js: Any, items: list[tuple[str, bytes, dict[str, str]]], window: int = 64) -> int:
    last = 0
    for i in range(0, len(items), window):
        acks = await asyncio.gather(*(js.publish(s, d, headers=h) for s, d, h in items[i : i + window]))
        last = max(last, *(a.seq for a in acks))
    return last


def _stored_chain(worker: int, event_id: int, start: int, n: int) -> bytes:
    blocks = [(worker * 10**9 + start + i, (worker * 7919 + start + i) & 0xFFFFFFFFFFFF) for i in range(n)]
    return codec.encode_msgpack(stored_event(worker, event_id, blocks))


async def backlog(messages: int, blocks: int, workdir: Path) -> dict[str, Any]:
    """KVR_KV holds `messages` × `blocks` before `kvr indexer` starts: time to ready, ready too early?"""
    server = NatsServer(log_file=str(workdir / "nats-backlog.log")).start()
    procs: list[ServiceProcess] = []
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision(js, NAMES, stream_settings(_cfg(ServiceConfig, server.url)))
        workers = 8
        for w in range(workers):
            await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=w, pool=POOL, ttl_s=3600, total_kv_blocks=10**7))
        mp = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK}
        items = [(NAMES.kv_subject(POOL, i % workers, 0), _stored_chain(i % workers, i // workers, (i // workers) * blocks, blocks), mp)
                 for i in range(messages)]
        payload_bytes = sum(len(d) for _, d, _ in items)
        last = await _publish_all(js, items, window=8)
        proc = ServiceProcess("indexer", args=["--snapshot-every-events", "0", "--snapshot-interval-s", "0"], nats_url=server.url,
                              pools=[POOL], log_path=str(workdir / "indexer-backlog.log"))
        procs.append(proc.start())
        started = time.monotonic()
        ready_at = first_applied_at = None
        ready_early = False
        while time.monotonic() - started < 120:
            status = _readyz(proc)
            applied = int(status.get("applied_seq", 0) or 0)
            if applied and first_applied_at is None:
                first_applied_at = time.monotonic() - started
            if status.get("_http_status") == 200:
                ready_at = time.monotonic() - started
                ready_early = applied < last
                break
            await asyncio.sleep(0.02)
        final = _readyz(proc)
        result = {
            "messages": messages, "blocks_per_message": blocks, "payload_mb": round(payload_bytes / 2**20, 1),
            "seconds_to_ready": round(ready_at, 2) if ready_at is not None else None,
            # process start → first message applied (interpreter, imports, connect, discovery)
            "seconds_to_first_applied": round(first_applied_at, 2) if first_applied_at is not None else None,
            "ready_before_all_applied": ready_early, "applied_seq_at_ready": final.get("applied_seq"), "last_seq": last,
            "final_readyz_error": final.get("_error"),
            "slow_consumers": _varz(server)["slow_consumers"],
            "follower_resets": (final.get("followers") or {}).get("kv", {}).get("resets"),
            "indexer_rss_mb": round(rss_mb(proc.proc.pid), 1) if proc.proc else None,
        }
        await nc.close()
        return result
    finally:
        for p in procs:
            p.terminate()
        server.cleanup()


async def flood(workers: int, total_blocks: int, workdir: Path, blocks_per_message: int = 500) -> dict[str, Any]:
    """Unregistered worker ids publish `total_blocks`: RSS of the indexer and a scheduler before/after."""
    server = NatsServer(log_file=str(workdir / "nats-flood.log")).start()
    procs: list[ServiceProcess] = []
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision(js, NAMES, stream_settings(_cfg(ServiceConfig, server.url)))
        await put_worker(nc, NAMES.workers_bucket, WorkerRecord(worker_id=1, pool=POOL, ttl_s=3600))
        indexer = ServiceProcess("indexer", args=["--snapshot-every-events", "0", "--snapshot-interval-s", "0"], nats_url=server.url,
                                 pools=[POOL], log_path=str(workdir / "indexer-flood.log"))
        scheduler = ServiceProcess("scheduler", args=["--router-id", "flood"], nats_url=server.url, pools=[POOL],
                                   log_path=str(workdir / "scheduler-flood.log"))
        procs.extend((indexer.start(), scheduler.start()))
        await asyncio.to_thread(indexer.wait_ready)
        await asyncio.to_thread(scheduler.wait_ready)
        await asyncio.sleep(1.0)
        before = {"indexer": rss_mb(indexer.proc.pid), "scheduler": rss_mb(scheduler.proc.pid)}  # type: ignore[union-attr]
        mp = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK}
        messages = max(1, total_blocks // blocks_per_message)
        started = time.monotonic()
        last = 0
        for chunk in range(0, messages, 2000):
            items = []
            for i in range(chunk, min(messages, chunk + 2000)):
                w, n = 10_000 + i % workers, i // workers
                items.append((NAMES.kv_subject(POOL, w, 0), _stored_chain(w, n, n * blocks_per_message, blocks_per_message), mp))
            last = await _publish_all(js, items)
        publish_s = time.monotonic() - started
        for proc in (indexer, scheduler):
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = _readyz(proc)
                applied = status.get("applied_seq") if proc is indexer else None
                if proc is scheduler:
                    applied = _scheduler_kv_applied(proc)
                if applied is not None and applied >= last:
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        after = {"indexer": rss_mb(indexer.proc.pid), "scheduler": rss_mb(scheduler.proc.pid)}  # type: ignore[union-attr]
        final = _readyz(indexer)
        pool_status = (final.get("pools") or {}).get(POOL, {})
        unknown, blocks = pool_status.get("unknown_workers", {}), pool_status.get("blocks", {})
        result = {
            "workers": workers, "blocks": messages * blocks_per_message, "messages": messages, "publish_s": round(publish_s, 1),
            "rss_before_mb": {k: round(v, 1) for k, v in before.items()}, "rss_after_mb": {k: round(v, 1) for k, v in after.items()},
            "rss_growth_mb": {k: round(after[k] - before[k], 1) for k in before},
            "indexer_unknown_workers": unknown, "indexer_blocks": blocks, "final_readyz_error": final.get("_error"),
        }
        await nc.close()
        return result
    finally:
        for p in procs:
            p.terminate()
        server.cleanup()


def _scheduler_kv_applied(proc: ServiceProcess) -> int | None:
    """None while unknown, including a /metrics that does not answer in time (the caller polls on)."""
    for line in proc.scrape("/metrics").body.splitlines():
        if line.startswith("kvr_follower_applied_seq") and 'follower="indexer-kv"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return None


# ---- main -------------------------------------------------------------------------------------


async def run_fuzz(requests: int, messages: int, seed: int) -> dict[str, Any]:
    server = NatsServer().start()
    try:
        stack = await Stack.start(server.url)
        try:
            endpoints = await fuzz_endpoints(stack, requests, seed)
            streams = await fuzz_streams(stack, messages, seed)
        finally:
            await stack.stop()
        return {"endpoints": {k: v.as_dict() for k, v in endpoints.items()}, "streams": streams}
    finally:
        server.cleanup()


def table(res: dict[str, Any]) -> str:
    lines = []
    if "fuzz" in res:
        lines.append("| endpoint | sent | ok | invalid_request | other errors | internal | no reply | state changed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for ep, r in res["fuzz"]["endpoints"].items():
            codes = r["codes"]
            other = sum(v for k, v in codes.items() if k not in ("ok", "invalid_request", "internal"))
            row = [ep, r["sent"], codes.get("ok", 0), codes.get("invalid_request", 0), other, r["internal"], r["no_reply"], r["state_changed"]]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
        lines.append("| stream | sent | malformed (expected) | counted | ")
        lines.append("|---|---|---|---|")
        for name in ("kv", "discovery", "bookings"):
            r = res["fuzz"]["streams"][name]
            lines.append(f"| {name} | {r['sent']} | {r['malformed_expected']} | {r['malformed_counted']} |")
        lines.append(f"apply failures (tracebacks): {res['fuzz']['streams']['apply_failures']}")
    if "backlog" in res:
        b = res["backlog"]
        lines.append("")
        lines.append(
            f"backlog {b['messages']} × {b['blocks_per_message']} blocks ({b['payload_mb']} MB): ready after {b['seconds_to_ready']} s "
            f"(first message applied after {b['seconds_to_first_applied']} s), "
            f"ready before all applied: {b['ready_before_all_applied']}, slow consumers: {b['slow_consumers']}, "
            f"resets: {b['follower_resets']}"
        )
    if "flood" in res:
        f = res["flood"]
        lines.append("")
        lines.append(f"flood {f['blocks']} blocks from {f['workers']} unregistered workers: RSS growth {f['rss_growth_mb']} MB "
                     f"(before {f['rss_before_mb']}, after {f['rss_after_mb']})")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.log"):
        old.unlink()  # one run's logs only
    res: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}}
    only = set(args.only.split(",")) if args.only else {"fuzz", "backlog", "flood"}
    if "fuzz" in only:
        res["fuzz"] = await run_fuzz(args.fuzz_requests, args.fuzz_messages, args.seed)
    if "backlog" in only:
        res["backlog"] = await backlog(args.backlog_messages, args.backlog_blocks, workdir)
    if "flood" in only:
        res["flood"] = await flood(args.flood_workers, args.flood_blocks, workdir)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated: fuzz, backlog, flood")
    ap.add_argument("--fuzz-requests", type=int, default=10_000, help="per endpoint")
    ap.add_argument("--fuzz-messages", type=int, default=20_000 // 3, help="per stream (KV, discovery, bookings)")
    ap.add_argument("--backlog-messages", type=int, default=200)
    ap.add_argument("--backlog-blocks", type=int, default=8192)
    ap.add_argument("--flood-workers", type=int, default=1000)
    ap.add_argument("--flood-blocks", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=".kvr/bench-hostile")
    ap.add_argument("--out", default=str(RESULTS / "hostile_input.json"))
    args = ap.parse_args()
    setup_logging("console", "error")  # the in-process services log every rejected request at debug
    res = asyncio.run(amain(args))
    print(table(res))
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
