"""The stack under test of the request benchmarks: a fleet seeded into discovery and KVR_KV, and the
service processes of each mode (`start_stack`), plus the stand-ins (`StubProcess`): a scheduler that
answers at once (the bridge's own share) and floor servers (what NATS and our responder cost).

Run as a script, it is one of those stand-ins: `python bench/lib/stack.py --stub-scheduler URL` or
`--floor-server nats|responder URL`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from schemas import codec
from schemas.discovery import WorkerRecord
from schemas.events import kv_msg_id
from schemas.hashing import local_block_hashes
from schemas.subjects import Names
from services.runtime.procs import Scrape, ServiceProcess
from services.runtime.workers import now_ms, put_worker

POOL = "bench"
BLOCK = 16
NAMES = Names()


async def stub_scheduler(url: str) -> None:
    """`bridge-only` mode: answers scheduler.select / booking at once with a fixed target, so the
    row measures the bridge and the two NATS hops alone."""
    from schemas.api import (
        CleanupReply,
        CleanupRequest,
        SelectReply,
        SelectRequest,
        Target,
    )
    from services.runtime.responder import serve

    nc = await nats.connect(url)
    target = Target(1, 0, "vllm-1", "10.0.0.1:8000")

    async def select(req: SelectRequest, _msg: Msg) -> SelectReply:
        isl = req.isl_tokens or 0
        return SelectReply(decode=target, prefill=None, overlap_blocks=0, isl_tokens=isl, block_size=BLOCK, cost=0.0)

    async def booking(req: CleanupRequest, _msg: Msg) -> CleanupReply:
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
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StubProcess:
        self.proc = subprocess.Popen([sys.executable, __file__, *self.role.split(), self.url])
        return self

    def metrics(self) -> str:
        return ""

    def scrape(self, _path: str, _timeout: float = 5.0) -> Scrape:
        return Scrape(200, "")  # no HTTP endpoint, nothing to measure: an empty answer

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


def start_stack(mode: str, url: str, tok_dir: Path, logs: Path, tokenize_threads: int) -> list[StubProcess | ServiceProcess]:
    """The processes of `mode`, started and ready; the bridge (when there is one) last."""

    def service(command: str, *argv: str) -> ServiceProcess:
        log_name = "bridge" if command == "epp-bridge" else command
        return ServiceProcess(command, list(argv), nats_url=url, pools=[POOL], log_path=str(logs / f"{log_name}.log"))

    bridge_args = ["--epp-tokenizer-dir", str(tok_dir), "--block-size", str(BLOCK), "--log-level", "warning",
                   "--epp-tokenize-threads", str(tokenize_threads)]
    scheduler_args = ["--block-size", str(BLOCK), "--log-level", "warning"]
    procs: list[StubProcess | ServiceProcess]
    if mode in ("nats-floor", "responder-floor"):
        procs = [StubProcess(url, f"--floor-server {mode.split('-')[0]}", NAMES.epp_query(POOL))]
    elif mode == "bridge-only":
        procs = [StubProcess(url), service("epp-bridge", *bridge_args)]
    elif mode == "separate-embedded-index":
        procs = [service("scheduler", *scheduler_args, "--embedded-indexer"), service("epp-bridge", *bridge_args)]
    elif mode == "one-process":
        procs = [service("epp-bridge", *bridge_args, "--epp-embedded-scheduler", "--embedded-indexer")]
    else:
        procs = [
            service("indexer", "--log-level", "warning"),
            service("scheduler", *scheduler_args, "--embedded-indexer", "false"),
            service("epp-bridge", *bridge_args),
        ]
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready(60)
    return procs


async def seed_fleet(nc: NATS, workers: int, prefixes: list[list[int]]) -> None:
    for wid in range(1, workers + 1):
        rec = WorkerRecord(worker_id=wid, pool=POOL, pod_name=f"vllm-{wid}", address=f"10.0.0.{wid}", port=8000,
                           block_size=BLOCK, ttl_s=3600, heartbeat_ms=now_ms())
        await put_worker(nc, "KVR_WORKERS", rec)
    js = nc.jetstream()
    next_event: dict[int, int] = {}
    for i, tokens in enumerate(prefixes):
        wid = 1 + i % workers
        eid = next_event.get(wid, 1)
        next_event[wid] = eid + 1
        hashes = local_block_hashes(tokens, BLOCK)
        blocks = [{"block_hash": (wid << 32) + eid * 1000 + j, "tokens_hash": h} for j, h in enumerate(hashes)]
        stored = {"stored": {"parent_hash": None, "blocks": blocks}}
        event = {"worker_id": wid, "event": {"event_id": eid, "dp_rank": 0, "data": stored}}
        headers = {"Nats-Msg-Id": kv_msg_id(POOL, wid, 0, eid)}
        await js.publish(NAMES.kv_subject(POOL, wid, 0), codec.encode_json(event), headers=headers)
    # Wait until routing sees the last prefix (asked through the bridge: works in both modes).
    last = prefixes[-1]
    probe = {"request_id": "probe", "body": {"prompt": "", "nvext": {"token_data": last}}, "book": False}
    for _ in range(400):
        msg = await nc.request(NAMES.epp_query(POOL), msgspec.json.encode(probe), timeout=5)
        if msgspec.json.decode(msg.data).get("overlap_blocks") == len(last) // BLOCK:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("KV events were not indexed")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--stub-scheduler":
        asyncio.run(stub_scheduler(sys.argv[2]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--floor-server":
        asyncio.run(floor_server(sys.argv[3], sys.argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
