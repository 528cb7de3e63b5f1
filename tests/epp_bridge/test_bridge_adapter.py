"""The bridge adapter against a real nats-server, with a scripted scheduler responder.

The scripted scheduler lets these tests reach failure modes a healthy scheduler never shows
(late answers, error envelopes). Decisions with the real scheduler and indexer processes are in
test_acceptance.py.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from schemas import codec
from schemas.api import CleanupReply, CleanupRequest, SelectReply, SelectRequest, Target
from schemas.hashing import local_block_hashes, salt_seed
from schemas.subjects import Names
from services.runtime.responder import ServiceError, serve

from .helpers import record, register, start_bridge

NAMES = Names()
POOL = "p"


class ScriptedScheduler:
    def __init__(self) -> None:
        self.selects: list[SelectRequest] = []
        self.bookings: dict[str, str] = {}
        self.cleanups: list[CleanupRequest] = []
        self.cancelled: set[str] = set()  # booking ids freed before they were booked
        self.delay_s = 0.0
        self.error: ServiceError | None = None

    async def start(self, nc) -> None:
        await serve(nc, NAMES.select(POOL), SelectRequest, self.select, queue="scheduler", max_inflight=64)
        await serve(nc, NAMES.booking(POOL), CleanupRequest, self.booking, queue="scheduler", max_inflight=64)

    async def select(self, req: SelectRequest, _msg) -> SelectReply:
        self.selects.append(req)
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        if req.pinned_worker_id is not None:
            wid, rank = req.pinned_worker_id, req.pinned_dp_rank or 0
        elif req.allowed_targets:
            wid, rank = req.allowed_targets[0]
        else:
            wid, rank = (req.allowed_worker_ids or [1])[0], 0
        if req.book and req.booking_id not in self.cancelled:  # like the real scheduler
            self.bookings[req.request_id] = req.booking_id or "active"
        prefill = Target(9, 0, "vllm-9", "10.0.0.9:8000") if req.mode == "disaggregated" else None
        return SelectReply(
            decode=Target(wid, rank, f"vllm-{wid}", None), prefill=prefill, overlap_blocks=0,
            isl_tokens=req.isl_tokens or 0, block_size=16, cost=1.0,
            mode="disaggregated" if prefill else "aggregated",
        )

    async def booking(self, req: CleanupRequest, _msg) -> CleanupReply:
        self.cleanups.append(req)
        known = req.request_id in self.bookings and req.booking_id in (None, self.bookings[req.request_id])
        if known and req.phase == "free":
            del self.bookings[req.request_id]
        elif not known and req.phase == "free" and req.booking_id:
            self.cancelled.add(req.booking_id)
        return CleanupReply(request_id=req.request_id, known=known)


async def ask(nc, subject: str, payload, msgpack: bool = False) -> dict:
    if msgpack:
        msg = await nc.request(subject, codec.encode_msgpack(payload), timeout=5, headers={"Content-Type": codec.MSGPACK})
        return msgspec.msgpack.decode(msg.data)
    data = payload if isinstance(payload, bytes) else codec.encode_json(payload)
    msg = await nc.request(subject, data, timeout=5)
    return msgspec.json.decode(msg.data)


@pytest.fixture
async def setup(nc, nats_url):
    sched = ScriptedScheduler()
    await sched.start(nc)
    bridge = await start_bridge(nc, nats_url, "--pool", POOL, "--epp-select-timeout-s", "0.3", "--epp-max-body-bytes", "20000")
    await register(nc, [record(1), record(2, taints=["zone=a"]), record(3, dp_size=2, dp_ports=[9000, 9001])])
    for _ in range(100):
        if len(bridge.watcher.directory.live(POOL)) == 3:
            break
        await asyncio.sleep(0.02)
    yield sched, bridge
    await bridge.stop()


async def test_query_maps_pods_nvext_and_headers(nc, setup):
    sched, bridge = setup
    tokens = list(range(1, 11))  # two full blocks of 4 and a partial one
    payload = {
        "request_id": "r-1",
        "body": {"prompt": tokens, "nvext": {"lora_name": "l", "agent_hints": {"priority": 2}, "expected_output_tokens": 9}},
        "pods": [{"pod": {"podName": "vllm-2"}}, {"podName": "ghost"}, {"address": "10.0.0.3", "port": 9001}],
        "return_token_ids": True,
    }
    reply = await ask(nc, NAMES.epp_query(POOL), payload)
    assert reply["status"] == "ok", reply
    sent = sched.selects[-1]
    # The pods become (worker, dp rank) candidates (issue 18): vllm-2 is worker 2's only rank, and
    # 10.0.0.3:9001 is rank 1 of worker 3 alone (before, every rank of worker 3 was a candidate).
    assert [tuple(t) for t in sent.allowed_targets or ()] == [(2, 0), (3, 1)] and sent.allowed_worker_ids is None
    assert sent.lora_name == "l" and sent.priority == 2
    assert sent.expected_output_tokens == 9 and sent.book
    # The workers' block size is known, so the scheduler gets the LoRA-seeded block hashes, not tokens.
    assert sent.token_ids is None and sent.isl_tokens == 10
    assert sent.block_hashes == local_block_hashes(tokens, 4, salt_seed("l"))
    assert reply["token_ids"] == tokens
    # The scheduler gave no endpoint; the bridge fills it from the matching pod when it has one.
    assert reply["headers"]["x-worker-instance-id"] == "2" and reply["headers"]["x-dp-rank"] == "0"

    dis = await ask(nc, NAMES.epp_query(POOL), {"request_id": "r-2", "body": {"prompt": [1]}, "mode": "disaggregated"}, msgpack=True)
    assert dis["status"] == "ok" and dis["mode"] == "disaggregated"
    assert dis["headers"]["x-prefill-instance-id"] == "9" and dis["headers"]["x-prefiller-host-port"] == "10.0.0.9:8000"


async def test_rejections_never_reach_the_scheduler(nc, setup):
    sched, _ = setup
    cases = [
        ({"request_id": "a", "body": {"prompt": [1]}, "pods": [{"name": "ghost"}]}, "no_workers"),
        ({"request_id": "b", "body": {"prompt": [1], "nvext": {"routing_constraints": {"required_taints": ["zone=b"]}}}}, "constraints_unsatisfied"),
        ({"request_id": "c", "body": {"prompt": [1], "nvext": {"routing_constraints": {"required_taints": ["zone=a"]}}}, "pods": [{"name": "vllm-1"}]}, "constraints_unsatisfied"),
        ({"request_id": "d", "body": {"prompt": "text needs a tokenizer"}}, "invalid_request"),
        ({"request_id": "e", "body": {"prompt": [1] * 12000}}, "invalid_request"),  # > max body bytes
        ({"request_id": "f", "body": {}}, "invalid_request"),
        ({"request_id": "", "body": {"prompt": [1]}}, "invalid_request"),
    ]
    for payload, code in cases:
        reply = await ask(nc, NAMES.epp_query(POOL), payload)
        assert reply["status"] == "error" and reply["error"]["code"] == code, (payload, reply)
    assert sched.selects == []
    big = await ask(nc, NAMES.epp_query(POOL), {"request_id": "e", "body": {"prompt": [1] * 12000}})
    assert "limit of 20000" in big["error"]["message"]
    # The body is validated as it is decoded; paths start at the request (JSON and msgpack alike).
    for msgpack in (False, True):
        bad = await ask(nc, NAMES.epp_query(POOL), {"request_id": "g", "body": {"prompt": "x", "nvext": {"token_data": [3, -1]}}}, msgpack=msgpack)
        assert bad["error"]["code"] == "invalid_request" and bad["error"]["path"] == "$.body.nvext.token_data[1]", bad
        both = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h", "body": {"prompt": [1], "messages": [{"role": "user"}]}}, msgpack=msgpack)
        assert both["error"]["path"] == "$.body" and "exactly one" in both["error"]["message"], both
    assert sched.selects == []


async def test_scheduler_errors_keep_their_code(nc, setup):
    sched, _ = setup
    sched.error = ServiceError("overloaded", "queue full")
    reply = await ask(nc, NAMES.epp_query(POOL), {"request_id": "r-9", "body": {"prompt": [1]}})
    assert reply["error"] == {"code": "overloaded", "message": "queue full"}


async def test_late_scheduler_is_a_timeout_and_its_booking_is_freed(nc, setup):
    sched, bridge = setup
    sched.delay_s = 0.6  # the bridge waits 0.3 s
    reply = await ask(nc, NAMES.epp_query(POOL), {"request_id": "late-1", "body": {"prompt": [1, 2]}})
    assert reply["status"] == "error" and reply["error"]["code"] == "timeout"
    await asyncio.sleep(0.6)  # the scheduler answers the select (too late) after the free arrived
    assert "late-1" not in sched.bookings
    # One free, of exactly the booking this query asked for (a reused request id's newer booking is
    # never touched); answered "not booked", which cancelled it, so no retries follow.
    (select,) = [r for r in sched.selects if r.request_id == "late-1"]
    frees = [(c.phase, c.booking_id) for c in sched.cleanups if c.request_id == "late-1"]
    assert select.booking_id and frees == [("free", select.booking_id)]
    # A dry run (book=false) that times out needs no compensation.
    await ask(nc, NAMES.epp_query(POOL), {"request_id": "late-2", "body": {"prompt": [1]}, "book": False})
    await asyncio.sleep(0.7)
    assert not any(c.request_id == "late-2" for c in sched.cleanups)


async def test_cleanup_forwards_and_is_idempotent(nc, setup):
    sched, _ = setup
    assert (await ask(nc, NAMES.epp_query(POOL), {"request_id": "c-1", "body": {"prompt": [1]}}))["status"] == "ok"
    subj = NAMES.epp_cleanup(POOL)
    assert (await ask(nc, subj, {"request_id": "c-1", "phase": "prefill_complete"}))["known"] is True
    assert (await ask(nc, subj, {"request_id": "c-1", "phase": "free"})) == {"request_id": "c-1", "known": True, "status": "ok"}
    assert (await ask(nc, subj, {"request_id": "c-1", "phase": "free"}))["known"] is False
    assert (await ask(nc, subj, {"request_id": "nope", "phase": "free"}))["known"] is False
    bad = await ask(nc, subj, {"request_id": "c-1", "phase": "done"})
    assert bad["error"]["code"] == "invalid_request" and bad["error"]["path"] == "$.phase"


async def test_no_scheduler_answers_timeout(nc, nats_url):
    bridge = await start_bridge(nc, nats_url, "--pool", "lonely", "--epp-select-timeout-s", "0.2")
    try:
        reply = await ask(nc, NAMES.epp_query("lonely"), {"request_id": "x", "body": {"prompt": [1]}})
        assert reply["error"]["code"] == "timeout"
        reply = await ask(nc, NAMES.epp_cleanup("lonely"), {"request_id": "x", "phase": "free"})
        assert reply["error"]["code"] == "timeout"
    finally:
        await bridge.stop()


async def kvr_epp(nats_url: str, *args: str) -> tuple[int, dict]:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "epp", args[0], "--nats-url", nats_url, "--pool", POOL, *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, (msgspec.json.decode(out) if out.strip() else {"stderr": err.decode()})


async def test_operator_client_sends_real_requests(nats_url, setup, tmp_path):
    sched, _ = setup
    code, reply = await kvr_epp(nats_url, "query", "--token-ids", "1,2,3", "--pod", "vllm-2", "--request-id", "cli-1", "--return-token-ids")
    assert code == 0 and reply["headers"]["x-worker-instance-id"] == "2" and reply["token_ids"] == [1, 2, 3]
    assert sched.selects[-1].request_id == "cli-1" and [tuple(t) for t in sched.selects[-1].allowed_targets or ()] == [(2, 0)]
    body = tmp_path / "body.json"
    body.write_text('{"prompt": [4, 5], "nvext": {"backend_instance_id": 3}}')
    code, reply = await kvr_epp(nats_url, "query", "--body-file", str(body), "--no-book", "--msgpack")
    assert code == 0 and reply["decode"]["worker_id"] == 3 and not sched.selects[-1].book
    code, reply = await kvr_epp(nats_url, "cleanup", "--request-id", "cli-1", "--phase", "free")
    assert code == 0 and reply == {"request_id": "cli-1", "known": True, "status": "ok"}
    code, reply = await kvr_epp(nats_url, "query", "--prompt", "needs a tokenizer")
    assert code == 1 and reply["error"]["code"] == "invalid_request"
    code, reply = await kvr_epp(nats_url, "query", "--message", "user:hi", "--pool", "nobody-serves-this", "--timeout", "0.5")
    assert code == 2 and "no EPP bridge serves pool 'nobody-serves-this'" in reply["stderr"]


async def test_pod_index_follows_discovery_changes_but_not_heartbeats(nc, setup):
    _, bridge = setup
    q = {"request_id": "idx", "body": {"prompt": [1]}, "book": False}
    assert (await ask(nc, NAMES.epp_query(POOL), {**q, "pods": [{"name": "vllm-1"}]}))["status"] == "ok"
    index = bridge.pod_index(POOL)
    await register(nc, [record(1)])  # heartbeat: same identity
    await asyncio.sleep(0.3)
    assert bridge.pod_index(POOL) is index
    await register(nc, [record(1, pod_name="renamed-1")])
    for _ in range(100):
        if (await ask(nc, NAMES.epp_query(POOL), {**q, "pods": [{"name": "renamed-1"}]}))["status"] == "ok":
            break
        await asyncio.sleep(0.05)
    assert bridge.pod_index(POOL) is not index
    gone = await ask(nc, NAMES.epp_query(POOL), {**q, "pods": [{"name": "vllm-1"}]})
    assert gone["error"]["code"] == "no_workers"
