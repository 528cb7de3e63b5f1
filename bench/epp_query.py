"""epp.query throughput and latency over NATS, separate processes vs one process.

Starts a real nats-server, registers a fleet in discovery, publishes KV events for shared prompt
prefixes, then drives `kvr.{pool}.epp.query` from this process:

* open loop at a fixed rate (the issue's targets: 1,000/s separate, 3,000/s one process), latency
  measured from send to reply;
* closed loop with N outstanding requests, for the highest rate the stack sustains.

Variants: `token_data` (nvext.token_data, no tokenization), `tokenize` (chat body rendered with the
chat template and tokenized by the bridge), `token_data_book` (book: true, each reply followed by
an untimed epp.cleanup free, as a gateway would). Modes: `separate-embedded-index` (kvr scheduler + kvr
epp-bridge: the default deployment, where the scheduler folds KVR_KV into its own index replica, as
Dynamo's router does), `separate` (kvr indexer + kvr scheduler --embedded-indexer false + kvr
epp-bridge: the remote-indexer layout, one more request/reply hop), `one-process` (kvr epp-bridge
--epp-embedded-scheduler --embedded-indexer) and
`bridge-only` (kvr epp-bridge in front of a stub scheduler that answers at once: the bridge's share),
and two floors: `nats-floor` (a bare nats-py subscription publishing a fixed reply) and
`responder-floor` (our `serve()` decoding the request and answering at once). Each row also records
the CPU share of every service process (% of one core).

    .venv/bin/python bench/epp_query.py                 # full table, ~2 minutes
    .venv/bin/python bench/epp_query.py --duration 3 --modes one-process --variants token_data
    .venv/bin/python bench/epp_query.py --modes one-process --variants token_data --loads target --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import codec  # noqa: E402
from schemas.discovery import WorkerRecord  # noqa: E402
from schemas.events import kv_msg_id  # noqa: E402
from schemas.hashing import local_block_hashes  # noqa: E402
from schemas.subjects import Names  # noqa: E402
from services.epp_bridge.tokenizer import PoolTokenizer  # noqa: E402
from services.runtime.embedded import NatsServer  # noqa: E402
from services.runtime.procs import ServiceProcess  # noqa: E402
from services.runtime.workers import now_ms, put_worker  # noqa: E402
from tests.epp_bridge.tokenizer_fixture import build_tokenizer_dir  # noqa: E402

POOL = "bench"
BLOCK = 16
NAMES = Names()
WORDS = "the quick brown fox jumps over lazy dog capital France Paris story dragon route worker cache prefix".split()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), for the CPU share of each service."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_totals(bridge: ServiceProcess) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) per phase of kvr_epp_phase_seconds, from the bridge's /metrics."""
    out: dict[str, list[float]] = {}
    for line in bridge.metrics().splitlines():
        for suffix, idx in (("_sum", 0), ("_count", 1)):
            prefix = f"kvr_epp_phase_seconds{suffix}{{phase=\""
            if line.startswith(prefix):
                phase = line[len(prefix):].split('"', 1)[0]
                out.setdefault(phase, [0.0, 0.0])[idx] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def phase_means_us(before: dict, after: dict) -> dict[str, float]:
    means = {}
    for phase, (s1, c1) in after.items():
        s0, c0 = before.get(phase, (0.0, 0.0))
        if c1 > c0:
            means[phase] = round((s1 - s0) / (c1 - c0) * 1e6, 1)
    return means


async def stub_scheduler(url: str) -> None:
    """`bridge-only` mode: answers scheduler.select / booking at once with a fixed target, so the
    row measures the bridge and the two NATS hops alone."""
    from schemas.api import CleanupReply, CleanupRequest, SelectReply, SelectRequest, Target
    from services.runtime.responder import serve

    nc = await nats.connect(url)
    target = Target(1, 0, "vllm-1", "10.0.0.1:8000")

    async def select(req: SelectRequest, _msg) -> SelectReply:
        return SelectReply(decode=target, prefill=None, overlap_blocks=0, isl_tokens=req.isl_tokens or 0, block_size=BLOCK, cost=0.0)

    async def booking(req: CleanupRequest, _msg) -> CleanupReply:
        return CleanupReply(request_id=req.request_id, known=True)

    await serve(nc, NAMES.select(POOL), SelectRequest, select, queue="scheduler")
    await serve(nc, NAMES.booking(POOL), CleanupRequest, booking, queue="scheduler")
    await asyncio.Event().wait()


async def floor_server(url: str, kind: str) -> None:
    """`nats-floor` / `responder-floor` modes: answer epp.query at once, to measure what the NATS
    client library (`nats-floor`: publish a fixed reply from a bare subscription callback) and our
    responder (`responder-floor`: `serve()` decoding the `EppQueryRequest` and encoding a reply) cost
    per request before any routing work."""
    from schemas.api import EppQueryReply, EppQueryRequest, Target
    from services.runtime.responder import serve

    nc = await nats.connect(url)
    target = Target(1, 0, "vllm-1", "10.0.0.1:8000")
    if kind == "nats":
        fixed = codec.encode_json(EppQueryReply("x", target, None, 0, 0, BLOCK, 0.0, {}))

        async def cb(msg: Msg) -> None:
            await nc.publish(msg.reply, fixed)

        await nc.subscribe(NAMES.epp_query(POOL), cb=cb)
    else:

        async def answer(req: EppQueryRequest, _msg: Msg) -> EppQueryReply:
            return EppQueryReply(req.request_id, target, None, 0, 0, BLOCK, 0.0, {})

        await serve(nc, NAMES.epp_query(POOL), EppQueryRequest, answer, max_inflight=512, inline=lambda _req: True)
    await asyncio.Event().wait()


class StubProcess:
    """A stand-in child process (stub scheduler or floor server) with ServiceProcess' start /
    wait_ready / terminate; `probe` is a subject it answers."""

    def __init__(self, url: str, role: str = "--stub-scheduler", probe: str = NAMES.booking(POOL)) -> None:
        self.url = url
        self.role = role
        self.probe = probe
        self.proc = None

    def start(self) -> StubProcess:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, *self.role.split(), self.url])
        return self

    def metrics(self) -> str:
        return ""

    def wait_ready(self, _timeout: float) -> StubProcess:
        async def probe() -> None:
            nc = await nats.connect(self.url)
            for _ in range(200):
                try:
                    await nc.request(self.probe, b'{"request_id": "x", "phase": "free"}', timeout=0.5)
                    break
                except Exception:  # noqa: BLE001 - not subscribed yet
                    await asyncio.sleep(0.05)
            await nc.close()

        asyncio.run(probe())
        return self

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def start_stack(mode: str, url: str, tok_dir: Path, logs: Path, tokenize_threads: int) -> list:
    bridge_args = ["--epp-tokenizer-dir", str(tok_dir), "--block-size", str(BLOCK), "--log-level", "warning",
                   "--epp-tokenize-threads", str(tokenize_threads)]  # fmt: skip
    if mode in ("nats-floor", "responder-floor"):
        procs = [StubProcess(url, f"--floor-server {mode.split('-')[0]}", NAMES.epp_query(POOL))]
    elif mode == "bridge-only":
        procs = [StubProcess(url), ServiceProcess("epp-bridge", bridge_args, nats_url=url, pools=[POOL], log_path=str(logs / "bridge.log"))]
    elif mode == "separate-embedded-index":
        procs = [
            ServiceProcess("scheduler", ["--block-size", str(BLOCK), "--log-level", "warning", "--embedded-indexer"], nats_url=url, pools=[POOL], log_path=str(logs / "scheduler.log")),
            ServiceProcess("epp-bridge", bridge_args, nats_url=url, pools=[POOL], log_path=str(logs / "bridge.log")),
        ]
    elif mode == "one-process":
        procs = [ServiceProcess("epp-bridge", [*bridge_args, "--epp-embedded-scheduler", "--embedded-indexer"], nats_url=url, pools=[POOL], log_path=str(logs / "bridge.log"))]
    else:
        procs = [
            ServiceProcess("indexer", ["--log-level", "warning"], nats_url=url, pools=[POOL], log_path=str(logs / "indexer.log")),
            ServiceProcess("scheduler", ["--block-size", str(BLOCK), "--log-level", "warning", "--embedded-indexer", "false"], nats_url=url, pools=[POOL], log_path=str(logs / "scheduler.log")),
            ServiceProcess("epp-bridge", bridge_args, nats_url=url, pools=[POOL], log_path=str(logs / "bridge.log")),
        ]
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready(60)
    return procs


async def seed_fleet(nc, workers: int, prefixes: list[list[int]]) -> None:
    for wid in range(1, workers + 1):
        rec = WorkerRecord(worker_id=wid, pool=POOL, pod_name=f"vllm-{wid}", address=f"10.0.0.{wid}", port=8000,
                           block_size=BLOCK, ttl_s=3600, heartbeat_ms=now_ms())  # fmt: skip
        await put_worker(nc, "KVR_WORKERS", rec)
    js = nc.jetstream()
    next_event: dict[int, int] = {}
    for i, tokens in enumerate(prefixes):
        wid = 1 + i % workers
        eid = next_event.get(wid, 1)
        next_event[wid] = eid + 1
        hashes = local_block_hashes(tokens, BLOCK)
        blocks = [{"block_hash": (wid << 32) + eid * 1000 + j, "tokens_hash": h} for j, h in enumerate(hashes)]
        event = {"worker_id": wid, "event": {"event_id": eid, "dp_rank": 0, "data": {"stored": {"parent_hash": None, "blocks": blocks}}}}
        await js.publish(NAMES.kv_subject(POOL, wid, 0), codec.encode_json(event), headers={"Nats-Msg-Id": kv_msg_id(POOL, wid, 0, eid)})
    # Wait until routing sees the last prefix (asked through the bridge: works in both modes).
    last = prefixes[-1]
    probe = {"request_id": "probe", "body": {"prompt": "", "nvext": {"token_data": last}}, "book": False}
    for _ in range(400):
        msg = await nc.request(NAMES.epp_query(POOL), msgspec.json.encode(probe), timeout=5)
        if msgspec.json.decode(msg.data).get("overlap_blocks") == len(last) // BLOCK:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("KV events were not indexed")


def make_payloads(variant: str, tok: PoolTokenizer, prefixes: list[list[int]], texts: list[str], n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        k = rng.randrange(len(prefixes))
        if variant == "tokenize":
            body = {"model": "tiny", "messages": [{"role": "system", "content": texts[k]}, {"role": "user", "content": " ".join(rng.choices(WORDS, k=30))}]}
        else:
            body = {"model": "tiny", "prompt": "", "nvext": {"token_data": prefixes[k] + [rng.randrange(600) for _ in range(256)]}}
        out.append(msgspec.json.encode({"request_id": f"b-{i}", "body": body, "book": variant == "token_data_book"}))
    return out


class _Reply(msgspec.Struct):
    """The fields of an epp.query answer this generator reads (ok or error envelope)."""

    status: str = ""
    request_id: str = ""
    error: dict[str, Any] | None = None


_REPLY = msgspec.json.Decoder(_Reply)


class _Delivered(NamedTuple):
    subject: str
    data: bytes


class WireClient(asyncio.Protocol):
    """The load generator's own minimal NATS connection (`--client wire`): the client protocol's PUB,
    SUB, MSG/HMSG and PING/PONG on an `asyncio.Protocol`, with every publish of one event-loop turn
    written in one `write`. The generator shares the 2 cores with the stack it measures; at 3,000/s
    this costs it about half the CPU of nats-py (whose per-message streams, queues, tasks and
    futures are what a service needs and a load generator does not). Bench code only: no
    reconnect, no TLS or auth, and callbacks must not suspend."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.subs: dict[bytes, Any] = {}
        self.pong: asyncio.Future[None] | None = None
        self.info = asyncio.get_running_loop().create_future()
        self._sid = 0
        self._inbox = 0

    @classmethod
    async def connect(cls, url: str) -> WireClient:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, int(port))
        await client.info
        client.pong = loop.create_future()
        client.transport.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"lang":"python-bench","protocol":1}\r\nPING\r\n')
        await client.pong
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def new_inbox(self) -> str:
        self._inbox += 1
        return f"_INBOX.bench{os.getpid()}x{self._inbox}"

    async def subscribe(self, subject: str, cb: Any) -> None:
        self._sid += 1
        self.subs[str(self._sid).encode()] = cb
        self._queue(f"SUB {subject} {self._sid}\r\n".encode())

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self._queue(b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, b"\r\n")))

    def _queue(self, data: bytes) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            head = bytes(buf[:eol]).split(b" ")
            op = head[0]
            if op in (b"MSG", b"HMSG"):
                total = int(head[-1])
                start = eol + 2 + (int(head[-2]) if op == b"HMSG" else 0)
                end = eol + 2 + total
                if len(buf) < end + 2:
                    return
                msg = _Delivered(head[1].decode(), bytes(buf[start:end]))
                del buf[: end + 2]
                cb = self.subs.get(head[2])
                if cb is not None:
                    try:
                        cb(msg).send(None)
                    except StopIteration:
                        continue
                    raise RuntimeError("WireClient callbacks must not suspend")
                continue
            del buf[: eol + 2]
            if op == b"PING":
                self._queue(b"PONG\r\n")
            elif op == b"PONG" and self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
            elif op == b"INFO" and not self.info.done():
                self.info.set_result(None)
            elif op == b"-ERR":
                raise RuntimeError(f"nats-server: {bytes(b' '.join(head))!r}")


async def drive(url: str, payloads: list[bytes], rate: float | None, concurrency: int, duration: float, book: bool, client: str = "wire") -> dict:
    """Open loop (rate given): one pacing loop publishes request k at start + k/rate (all requests due
    by now, as a burst when the loop wakes late) and its latency counts from that due time, so neither
    a late generator nor a stalled stack can hide queueing (no coordinated omission). Closed loop:
    `concurrency` requests outstanding, each reply sends the next; latency from its send.

    Replies come back on one wildcard inbox subscription: no coroutine, future or timer per request.
    The generator shares the 2 cores with the stack it measures, and this keeps its own CPU low: at
    3,000/s ≈ 25 % of a core with `client="wire"` (`WireClient`), ≈ 36 % with nats-py, against ≈ 41 %
    for one `nc.request` coroutine per request."""
    nc: Any = await WireClient.connect(url) if client == "wire" else await nats.connect(url, pending_size=256 * 1024 * 1024)
    subject = NAMES.epp_query(POOL)
    cleanup = NAMES.epp_cleanup(POOL)
    inbox = nc.new_inbox()
    free_inbox = nc.new_inbox()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    due_of: dict[str, float] = {}  # reply token → due (open loop) or send time (closed loop)
    frees = {"sent": 0, "answered": 0}
    run = {"next": 0, "refill": 0, "measuring": False}

    async def send(k: int, due: float) -> None:
        token = str(k)
        due_of[token] = due
        await nc.publish(subject, payloads[k % len(payloads)], reply=f"{inbox}.{token}")

    async def on_reply(msg: Msg) -> None:
        due = due_of.pop(msg.subject[len(inbox) + 1 :], None)
        if due is None:
            return
        dt = time.perf_counter() - due
        reply = _REPLY.decode(msg.data)
        if reply.status != "ok":
            code = (reply.error or {}).get("code", "malformed")
            errors[code] = errors.get(code, 0) + 1
        else:
            if run["measuring"]:
                latencies.append(dt)
            if book:
                frees["sent"] += 1
                free = msgspec.json.encode({"request_id": reply.request_id, "phase": "free"})
                await nc.publish(cleanup, free, reply=free_inbox)
        if run["refill"] > 0:  # closed loop (and warm-up): the answer makes room for the next request
            run["refill"] -= 1
            k = run["next"]
            run["next"] = k + 1
            await send(k, time.perf_counter())

    async def on_free(_msg: Msg) -> None:
        frees["answered"] += 1

    async def settle(limit: float) -> None:
        deadline = time.perf_counter() + limit
        while (due_of or frees["answered"] < frees["sent"]) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)

    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    await nc.subscribe(free_inbox, cb=on_free)
    run["refill"] = 49  # warm-up: 50 requests one at a time, not measured
    run["next"] = 1
    await send(0, time.perf_counter())
    while run["refill"] > 0 or due_of:
        await asyncio.sleep(0.005)
    await settle(5)
    errors.clear()
    run["measuring"] = True
    start = time.perf_counter()
    end = start + duration
    base = run["next"]
    if rate is None:
        run["refill"] = 1 << 62
        for _ in range(concurrency):
            k = run["next"]
            run["next"] = k + 1
            await send(k, time.perf_counter())
        await asyncio.sleep(duration)
        run["refill"] = 0
    else:
        total = int(duration * rate)
        k = 0
        while k < total:
            now = time.perf_counter()
            while k < total and start + k / rate <= now:
                await send(base + k, start + k / rate)
                k += 1
            if k < total:
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
        run["next"] = base + total
    await settle(5)
    elapsed = time.perf_counter() - start
    sent = run["next"] - base
    if due_of:
        errors["no_reply_within_5s"] = len(due_of)
    if frees["answered"] < frees["sent"]:
        errors["free_unanswered"] = frees["sent"] - frees["answered"]
    await nc.close()
    lat = sorted(latencies)
    return {
        "sent": sent,
        "ok": len(lat),
        "errors": errors,
        "throughput_qps": round(len(lat) / elapsed, 1),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
        "p90_ms": round(percentile(lat, 0.90) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3) if lat else None,
    }


# p99 targets of issue #5, by mode (ms)
P99_TARGET_MS = {"separate": 10.0, "separate-embedded-index": 10.0, "one-process": 5.0}


def plot_open_loop(rows: list[dict], targets: dict[str, float], path: Path) -> Path | None:
    """p50 / p90 / p99 of every open-loop run at a mode's target rate, one panel per mode and variant,
    with the p99 target as a dashed line: the run-to-run spread is the point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["load"] == f"open {targets[r['mode']]:.0f}/s":
            groups.setdefault((r["mode"], r["variant"]), []).append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ((mode, variant), runs) in zip(axes[0], groups.items()):
        x = range(1, len(runs) + 1)
        for key, marker in (("p99_ms", "o"), ("p90_ms", "s"), ("p50_ms", "^")):
            ax.plot(x, [r[key] for r in runs], marker=marker, linestyle="none", label=key.split("_")[0])
        if mode in P99_TARGET_MS:
            ax.axhline(P99_TARGET_MS[mode], color="red", linestyle="--", linewidth=1, label="p99 target")
        ax.set_title(f"{mode} · {variant}\nopen {targets[mode]:.0f}/s", fontsize=9)
        ax.set_xlabel("run")
        ax.set_ylabel("latency (ms)")
        ax.set_xticks(list(x))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--stub-scheduler":
        asyncio.run(stub_scheduler(sys.argv[2]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--floor-server":
        asyncio.run(floor_server(sys.argv[3], sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prefixes", type=int, default=64, help="distinct cached prompt prefixes")
    ap.add_argument("--modes", default="separate-embedded-index,separate,one-process,bridge-only",
                    help="separate-embedded-index (the default deployment), separate (remote indexer), one-process, bridge-only (the bridge in front of a stub scheduler that answers at once), "
                         "nats-floor / responder-floor (a process answering at once: the NATS client's and the responder's cost)")
    ap.add_argument("--variants", default="token_data,tokenize,token_data_book")
    ap.add_argument("--concurrency", type=int, default=32, help="outstanding requests in the closed-loop run")
    ap.add_argument("--client", choices=("wire", "nats-py"), default="wire",
                    help="the generator's NATS client: its own minimal one (default, least CPU) or nats-py")
    ap.add_argument("--tokenize-threads", type=int, default=0, help="--epp-tokenize-threads of the bridge")
    ap.add_argument("--loads", default="light,target,closed", help="which loads to run: light, target (the issue's rate), closed")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per load (the p99 of a 2-core machine varies run to run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "epp_query.json"))
    args = ap.parse_args()
    targets = {"separate": 1000.0, "separate-embedded-index": 1000.0, "one-process": 3000.0, "bridge-only": 1000.0, "nats-floor": 3000.0, "responder-floor": 3000.0}
    # well below capacity: latency without queueing
    light = {"separate": 250.0, "separate-embedded-index": 250.0, "one-process": 500.0, "bridge-only": 250.0, "nats-floor": 500.0, "responder-floor": 500.0}
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="kvr-epp-bench-"))
    tok_dir = build_tokenizer_dir(tmp / "tok")
    tok = PoolTokenizer.load(tok_dir)
    texts = [" ".join(rng.choices(WORDS, k=300)) for _ in range(args.prefixes)]
    # Cached prefix = the chat-rendered system prompt, cut to whole blocks, so both variants can hit.
    prefixes = []
    for text in texts:
        ids = tok.encode_chat([{"role": "system", "content": text}], add_generation_prompt=False)
        prefixes.append(ids[: (len(ids) // BLOCK) * BLOCK])
    rows = []
    for mode in args.modes.split(","):
        server = NatsServer().start()
        logs = tmp / mode
        logs.mkdir()
        procs = start_stack(mode, server.url, tok_dir, logs, args.tokenize_threads)
        try:
            async def seed() -> None:
                nc = await nats.connect(server.url)
                await seed_fleet(nc, args.workers, prefixes)
                await nc.close()

            floor = mode.endswith("-floor")
            if mode != "bridge-only" and not floor:
                asyncio.run(seed())
            for variant in args.variants.split(","):
                if floor and variant != "token_data":
                    continue
                payloads = make_payloads(variant, tok, prefixes, texts, 4000, rng)
                book = variant == "token_data_book"
                loads = {"light": light[mode], "target": targets[mode], "closed": None}
                for rate in [loads[name] for name in args.loads.split(",") for _ in range(args.repeat)]:
                    before = phase_totals(procs[-1])
                    cpu0, t0 = {p.proc.pid: cpu_seconds(p.proc.pid) for p in procs}, time.perf_counter()
                    gen0, nats0 = cpu_seconds(os.getpid()), cpu_seconds(server.proc.pid)
                    res = asyncio.run(drive(server.url, payloads, rate, args.concurrency, args.duration, book, args.client))
                    wall = time.perf_counter() - t0
                    res["generator_cpu_pct"] = round((cpu_seconds(os.getpid()) - gen0) / wall * 100)
                    res["nats_server_cpu_pct"] = round((cpu_seconds(server.proc.pid) - nats0) / wall * 100)
                    res["bridge_phase_mean_us"] = phase_means_us(before, phase_totals(procs[-1]))
                    # CPU of each service process over the measurement (incl. warm-up), % of one core
                    res["service_cpu_pct"] = [round((cpu_seconds(pid) - c) / wall * 100) for pid, c in cpu0.items()]
                    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    row = {"mode": mode, "variant": variant, "load": f"open {rate:.0f}/s" if rate else f"closed c={args.concurrency}", **res}
                    rows.append(row)
                    print(f"{mode:23} {variant:16} {row['load']:14} ok/s={res['throughput_qps']:8.1f} p50={res['p50_ms']:7.3f}ms "
                          f"p99={res['p99_ms']:7.3f}ms errors={res['errors']} bridge µs={res['bridge_phase_mean_us']}", flush=True)  # fmt: skip
        finally:
            for p in procs:
                p.terminate()
            server.cleanup()

    print()
    print(f"{'mode':23} {'variant':16} {'load':14} {'ok/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'bridge µs':>10} {'cpu %':>12} {'gen/nats %':>10} {'load1':>6} errors")
    for r in rows:
        own = r["bridge_phase_mean_us"].get("parse", 0) + r["bridge_phase_mean_us"].get("tokenize", 0)
        cpu = "+".join(str(c) for c in r["service_cpu_pct"])
        print(f"{r['mode']:23} {r['variant']:16} {r['load']:14} {r['throughput_qps']:9.1f} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} "
              f"{r['p99_ms']:8.3f} {own:10.1f} {cpu:>12} {r['generator_cpu_pct']:>4}/{r['nats_server_cpu_pct']:<5} {r['loadavg_1m']:6.2f} {r['errors'] or ''}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
            "duration_s": args.duration, "client": args.client, "workers": args.workers, "tokenize_threads": args.tokenize_threads, "prefixes": args.prefixes, "block_size": BLOCK}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    png = plot_open_loop(rows, targets, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
