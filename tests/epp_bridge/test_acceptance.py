"""Issue #5 acceptance: real nats-server, real `kvr indexer`, `kvr scheduler` and `kvr epp-bridge` processes.

One service set serves every test of this module (pools `agg`, `dis`, `fuzz`); each test uses its own
workers and request ids, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.api import ERROR_HTTP_STATUS, EppQueryReply, MatchReply, MatchRequest, StateReply, StateRequest
from schemas.events import kv_msg_id
from schemas.subjects import Names
from services.epp_bridge.tokenizer import PoolTokenizer
from services.runtime.embedded import NatsServer
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request
from services.runtime.workers import delete_worker

from .helpers import record, register, stored_events

NAMES = Names()
BLOCK = 4
POOLS = ("agg", "dis", "fuzz")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tokenizer_dir):
    """nats-server + indexer + scheduler + epp-bridge, each writing its spans to its own file."""
    logs = tmp_path_factory.mktemp("epp-stack")
    server = NatsServer().start()
    procs: dict[str, ServiceProcess] = {}
    try:
        for command, extra in (
            ("indexer", []),
            # The remote-indexer layout: every query crosses bridge → scheduler → indexer (one trace).
            ("scheduler", ["--block-size", str(BLOCK), "--seed", "1", "--embedded-indexer", "false"]),
            ("epp-bridge", ["--epp-tokenizer-dir", str(tokenizer_dir), "--epp-select-timeout-s", "2", "--epp-tokenize-threads", "2"]),
        ):
            proc = ServiceProcess(
                command, [*extra, "--trace-file", str(logs / f"{command}.spans")], nats_url=server.url,
                pools=POOLS, log_path=str(logs / f"{command}.log"),
            )
            procs[command] = proc.start()
        for proc in procs.values():
            proc.wait_ready(60)
        yield {"url": server.url, "procs": procs, "dir": logs}
    finally:
        for proc in procs.values():
            proc.terminate()
        server.cleanup()


@pytest.fixture
async def conn(stack):
    nc = await nats.connect(stack["url"])
    yield nc
    await nc.close()


async def ask(nc, subject: str, payload) -> dict:
    data = payload if isinstance(payload, (bytes, bytearray)) else codec.encode_json(payload)
    msg = await nc.request(subject, data, timeout=10)
    return msgspec.json.decode(msg.data)


async def query(nc, pool: str, body: dict, **kw) -> dict:
    payload = {"request_id": kw.pop("request_id", f"q-{uuid.uuid4().hex[:10]}"), "body": body, **kw}
    return await ask(nc, NAMES.epp_query(pool), payload)


async def routed(nc, pool: str, body: dict, **kw) -> dict:
    reply = await query(nc, pool, body, **kw)
    assert reply["status"] == "ok", reply
    return reply


async def wait_for(predicate, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def publish_cached(nc, pool: str, worker_id: int, tokens: list[int], event_id: int = 1) -> None:
    """Publish the worker's KV event for `tokens` and wait until the indexer reports the overlap."""
    js = nc.jetstream()
    data = stored_events(worker_id, tokens, BLOCK, event_id=event_id)
    await js.publish(NAMES.kv_subject(pool, worker_id, 0), data, headers={"Nats-Msg-Id": kv_msg_id(pool, worker_id, 0, event_id)})
    want = len(tokens) // BLOCK

    async def indexed():
        reply = await request(nc, NAMES.match(pool), MatchRequest(token_ids=tokens), MatchReply)
        return any(s.worker_id == worker_id and s.blocks == want for s in reply.scores)

    await wait_for(indexed)


async def wait_workers(nc, pool: str, ids: set[int], absent: frozenset[int] = frozenset()) -> None:
    """Until the bridge and the scheduler both know these workers of `pool` (and none of `absent`)."""

    async def seen():
        state = await request(nc, NAMES.scheduler_state(pool), StateRequest(), StateReply)
        if not ids <= set(state.workers) or absent & set(state.workers):
            return False
        # The bridge knows each of them: a one-pod filter with an unmet required taint is then refused
        # as constraints_unsatisfied (an unknown pod would be no_workers), without reaching the scheduler.
        probe_body = {"prompt": [1], "nvext": {"routing_constraints": {"required_taints": ["kvr.test/probe"]}}}
        for i in ids:
            probe = await query(nc, pool, probe_body, pods=[{"name": f"vllm-{i}"}])
            if probe["error"]["code"] != "constraints_unsatisfied":
                return False
        return True

    await wait_for(seen)


async def scheduler_state(nc, pool: str) -> StateReply:
    return await request(nc, NAMES.scheduler_state(pool), StateRequest(), StateReply)


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> PoolTokenizer:
    return PoolTokenizer.load(tokenizer_dir)


CHAT = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant that answers questions about the weather."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "the news", "parameters": {}}}],
    "max_tokens": 16,
}
COMPLETION = {"model": "tiny", "prompt": "Tell me a story about a dragon who learned to route requests to the right worker."}


async def test_chat_and_completions_route_to_the_cached_worker(conn, tok):
    nc = conn
    await register(nc, [record(1, pool="agg"), record(2, pool="agg"), record(3, pool="agg")])
    await wait_workers(nc, "agg", {1, 2, 3})

    chat_tokens = tok.encode_chat(CHAT["messages"], CHAT["tools"])
    completion_tokens = tok.encode_text(COMPLETION["prompt"])
    assert len(chat_tokens) >= 8 * BLOCK and len(completion_tokens) >= 4 * BLOCK
    # The workers hold a prefix only: what an earlier conversation turn (same tools and system
    # prompt, earlier text) would have left in their cache.
    chat_prefix = chat_tokens[: (len(chat_tokens) // BLOCK - 3) * BLOCK]
    completion_prefix = completion_tokens[: 3 * BLOCK]
    await publish_cached(nc, "agg", 2, chat_prefix)
    await publish_cached(nc, "agg", 3, completion_prefix)

    chat = await routed(nc, "agg", CHAT, book=False, return_token_ids=True)
    assert chat["status"] == "ok", chat
    assert chat["token_ids"] == chat_tokens
    assert chat["decode"]["worker_id"] == 2 and chat["overlap_blocks"] == len(chat_prefix) // BLOCK
    assert chat["headers"]["x-worker-instance-id"] == "2"
    assert chat["headers"]["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
    msgspec.json.decode(codec.encode_json(chat), type=EppQueryReply)

    pre = await routed(nc, "agg", {**CHAT, "nvext": {"token_data": chat_tokens}}, book=False)
    assert (pre["decode"], pre["overlap_blocks"], pre["cost"]) == (chat["decode"], chat["overlap_blocks"], chat["cost"])

    comp = await routed(nc, "agg", COMPLETION, book=False)
    assert comp["decode"]["worker_id"] == 3 and comp["overlap_blocks"] == 3
    pre = await routed(nc, "agg", {"prompt": "", "nvext": {"token_data": completion_tokens}}, book=False)
    assert (pre["decode"], pre["overlap_blocks"], pre["cost"]) == (comp["decode"], comp["overlap_blocks"], comp["cost"])


async def test_pods_filter_and_constraints(conn, tok):
    nc = conn
    await register(nc, [record(4, pool="agg"), record(5, pool="agg", taints=["zone=a"]), record(6, pool="agg")])
    await wait_workers(nc, "agg", {4, 5, 6})
    tokens = tok.encode_text("The quick brown fox jumps over the lazy dog near the river bank at dawn.")
    await publish_cached(nc, "agg", 5, tokens, event_id=100)

    free_choice = await routed(nc, "agg", {"prompt": tokens}, book=False)
    assert free_choice["decode"]["worker_id"] == 5, free_choice
    filtered = await routed(nc, "agg", {"prompt": tokens}, book=False, pods=[{"podName": "vllm-4"}, {"pod": {"podName": "vllm-6"}}])
    assert filtered["status"] == "ok" and filtered["decode"]["worker_id"] in (4, 6) and filtered["overlap_blocks"] == 0, filtered
    by_address = await routed(nc, "agg", {"prompt": tokens}, book=False, pods=[{"address": "10.0.0.6", "port": 8000}])
    assert by_address["decode"]["worker_id"] == 6, by_address

    empty = await query(nc, "agg", {"prompt": tokens}, pods=[{"name": "ghost"}, {"address": "10.9.9.9", "port": 1}])
    assert empty["status"] == "error" and empty["error"]["code"] == "no_workers", empty
    taint = {"prompt": "the lazy dog", "nvext": {"routing_constraints": {"required_taints": ["zone=a"]}}}
    tainted = await routed(nc, "agg", taint, book=False)
    assert tainted["decode"]["worker_id"] == 5, tainted
    unsat = await query(nc, "agg", taint, pods=[{"name": "vllm-4"}, {"name": "vllm-6"}])
    assert unsat["error"]["code"] == "constraints_unsatisfied", unsat
    nowhere = await query(nc, "agg", {"prompt": tokens, "nvext": {"routing_constraints": {"required_taints": ["gpu=b200"]}}})
    assert nowhere["error"]["code"] == "constraints_unsatisfied", nowhere
    assert not any(b.startswith("q-") for b in (await scheduler_state(nc, "agg")).bookings)


async def test_disaggregated_pool_and_aggregated_fallback(conn, tok):
    nc = conn
    await register(
        nc,
        [
            record(11, pool="dis", role="prefill"),
            record(12, pool="dis", role="decode", port=8001),
            record(13, pool="dis", role="decode", port=8002),
        ],
    )
    await wait_workers(nc, "dis", {11, 12, 13})
    reply = await routed(nc, "dis", CHAT, book=False)
    assert reply["status"] == "ok" and reply["mode"] == "disaggregated", reply
    assert reply["prefill"]["worker_id"] == 11 and reply["decode"]["worker_id"] in (12, 13)
    decode = reply["decode"]["worker_id"]
    assert reply["headers"] == {
        "x-gateway-destination-endpoint": f"10.0.0.{decode}:{8000 + decode - 11}",
        "x-worker-instance-id": str(decode),
        "x-dp-rank": "0",
        "x-prefill-instance-id": "11",
        "x-prefill-dp-rank": "0",
        "x-prefiller-host-port": "10.0.0.11:8000",
        "x-dynamo-routing-mode": "disaggregated",
    }

    await delete_worker(nc, "KVR_WORKERS", "dis", 11)
    await wait_workers(nc, "dis", {12, 13}, absent={11})
    fallback = await routed(nc, "dis", CHAT, book=False)
    assert fallback["status"] == "ok" and fallback["mode"] == "aggregated" and fallback["prefill"] is None
    assert fallback["decode"]["worker_id"] in (12, 13)
    assert "x-prefill-instance-id" not in fallback["headers"] and fallback["headers"]["x-dynamo-routing-mode"] == "aggregated"


async def test_booking_lifecycle_is_visible_in_scheduler_state(conn):
    nc = conn
    await register(nc, [record(21, pool="agg"), record(1, pool="agg"), record(2, pool="agg"), record(3, pool="agg")])
    await wait_workers(nc, "agg", {1, 2, 3, 21})
    tokens = list(range(100, 100 + 8 * BLOCK))
    reply = await routed(nc, "agg", {"prompt": tokens}, request_id="book-1", pods=[{"name": "vllm-21"}])
    assert reply["status"] == "ok" and reply["decode"]["worker_id"] == 21

    def load_of(state: StateReply):
        return next((w for w in state.loads if w.worker_id == 21), None)

    state = await scheduler_state(nc, "agg")
    assert "book-1" in state.bookings
    load = load_of(state)
    assert load.active_requests == 1 and load.active_prefill_tokens == len(tokens) and load.active_blocks > 0

    cleanup = NAMES.epp_cleanup("agg")
    assert await ask(nc, cleanup, {"request_id": "book-1", "phase": "prefill_complete"}) == {"request_id": "book-1", "known": True, "status": "ok"}
    load = load_of(await scheduler_state(nc, "agg"))
    assert load.active_prefill_tokens == 0 and load.active_requests == 1
    assert (await ask(nc, cleanup, {"request_id": "book-1", "phase": "free"}))["known"] is True
    state = await scheduler_state(nc, "agg")
    assert "book-1" not in state.bookings
    load = load_of(state)
    assert load is None or (load.active_requests, load.active_blocks, load.active_prefill_tokens) == (0, 0, 0)
    # Repeated and unknown cleanups are harmless.
    for phase in ("free", "prefill_complete", "free"):
        again = await ask(nc, cleanup, {"request_id": "book-1", "phase": phase})
        assert again == {"request_id": "book-1", "known": False, "status": "ok"}
    assert (await ask(nc, cleanup, {"request_id": "never-seen", "phase": "free"}))["known"] is False
    assert "book-1" not in (await scheduler_state(nc, "agg")).bookings


async def test_one_trace_spans_bridge_scheduler_and_indexer(conn, stack):
    nc = conn
    await register(nc, [record(1, pool="agg"), record(2, pool="agg"), record(3, pool="agg")])
    await wait_workers(nc, "agg", {1, 2, 3})
    rid = f"trace-{uuid.uuid4().hex[:8]}"
    await routed(nc, "agg", {"prompt": "the quick brown fox jumps over the lazy dog"}, request_id=rid, book=False)

    def spans(service: str) -> list[dict]:
        path = Path(stack["dir"]) / f"{service}.spans"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    async def traced():
        bridge = [s for s in spans("epp-bridge") if s["name"] == "epp.query"]
        for span in reversed(bridge):
            tid = span["trace_id"]
            sched = [s for s in spans("scheduler") if s["trace_id"] == tid]
            index = [s for s in spans("indexer") if s["trace_id"] == tid]
            if sched and index:
                return span, sched, index
        return None

    bridge_span, sched_spans, index_spans = await wait_for(traced, timeout=10)
    assert any(s["name"] == "epp.tokenize" for s in spans("epp-bridge") if s["trace_id"] == bridge_span["trace_id"])
    assert {s["service"] for s in sched_spans} == {"kvr-scheduler"} and {s["service"] for s in index_spans} == {"kvr-indexer"}


# --- fuzz ---------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
request_ids = st.text(min_size=0, max_size=20) | st.sampled_from(["fz-1", "fz-2", "fz-3"]) | json_values
near_valid_query = st.fixed_dictionaries(
    {"request_id": request_ids},
    optional={
        "body": st.fixed_dictionaries(
            {},
            optional={
                "prompt": st.text(max_size=60) | st.lists(st.integers(-3, 2**33), max_size=40) | json_values,
                "messages": st.lists(
                    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bad"]), "content": st.text(max_size=40) | json_values}),
                    max_size=3,
                ) | json_values,
                "tools": json_values,
                "nvext": st.fixed_dictionaries(
                    {},
                    optional={
                        "token_data": st.lists(st.integers(-2, 2**33), max_size=40) | json_values,
                        "backend_instance_id": st.integers(-2, 40) | json_values,
                        "routing_constraints": st.fixed_dictionaries({}, optional={"required_taints": st.lists(st.sampled_from(["zone=a", "", "x"]), max_size=2)}) | json_values,
                        "agent_hints": json_values,
                    },
                ) | json_values,
            },
        ) | json_values,
        "pods": st.lists(st.fixed_dictionaries({}, optional={"name": st.sampled_from(["vllm-31", "vllm-32", "ghost"]), "podName": json_values, "port": json_values}), max_size=3) | json_values,
        "mode": st.sampled_from(["auto", "aggregated", "disaggregated", "weird"]) | json_values,
        "book": st.booleans() | json_values,
        "return_token_ids": st.booleans(),
        "policy": st.sampled_from(["kv", "random", "nope"]),
    },
)
valid_query = st.fixed_dictionaries(
    {
        "request_id": st.from_regex(r"\Afz-[a-z0-9]{1,8}\Z"),
        "body": st.one_of(
            st.fixed_dictionaries({"prompt": st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40)}),
            st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=60)}),
            st.fixed_dictionaries(
                {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=40)}), min_size=1, max_size=3)},
                optional={"tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(min_size=1, max_size=8)})}), max_size=2)},
            ),
        ),
    },
    optional={
        "pods": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["vllm-31", "vllm-32", "ghost"])}), max_size=3),
        "mode": st.sampled_from(["auto", "aggregated", "disaggregated"]),
        "book": st.booleans(),
    },
)
cleanup_payloads = st.fixed_dictionaries(
    {"request_id": request_ids, "phase": st.sampled_from(["free", "prefill_complete", "done"]) | json_values}
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: msgspec.json.encode(v)),
    near_valid_query.map(lambda v: ("query", v)),
    valid_query.map(lambda v: ("query", v)),
    valid_query.map(lambda v: ("query", v)),
    cleanup_payloads.map(lambda v: ("cleanup", v)),
)


def test_fuzz_both_subjects_keeps_the_service_up_and_leaves_no_booking(stack):
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(stack["url"]))
    booked_ok: list[str] = []
    outcomes: dict[str, int] = {}
    try:
        loop.run_until_complete(register(nc, [record(31, pool="fuzz"), record(32, pool="fuzz", taints=["zone=a"])]))
        loop.run_until_complete(wait_workers(nc, "fuzz", {31, 32}))

        async def one(item, to_cleanup: bool) -> None:
            if isinstance(item, tuple):
                kind, value = item
                subject = NAMES.epp_query("fuzz") if kind == "query" else NAMES.epp_cleanup("fuzz")
                data = msgspec.json.encode(value)
            else:
                subject = NAMES.epp_cleanup("fuzz") if to_cleanup else NAMES.epp_query("fuzz")
                data = item
            msg = await nc.request(subject, data, timeout=10)
            reply = msgspec.json.decode(msg.data)
            assert isinstance(reply, dict) and reply.get("status") in ("ok", "error"), reply
            if reply["status"] == "error":
                assert set(reply) == {"status", "error"} and reply["error"]["code"] in ERROR_HTTP_STATUS, reply
                assert isinstance(reply["error"]["message"], str)
                outcomes[reply["error"]["code"]] = outcomes.get(reply["error"]["code"], 0) + 1
                return
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            if "decode" in reply:
                parsed = msgspec.json.decode(msg.data, type=EppQueryReply)
                assert parsed.decode.worker_id in (31, 32) and parsed.headers["x-worker-instance-id"] == str(parsed.decode.worker_id)
                sent = msgspec.json.decode(data)
                if sent.get("book", True) is not False:
                    booked_ok.append(parsed.request_id)
                    # Free right away, as the gateway would: what remains afterwards was booked by a failure.
                    await nc.request(NAMES.epp_cleanup("fuzz"), codec.encode_json({"request_id": parsed.request_id, "phase": "free"}), timeout=10)
            else:
                assert set(reply) == {"status", "request_id", "known"}, reply

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(item=payloads, to_cleanup=st.booleans())
        def run(item, to_cleanup):
            loop.run_until_complete(one(item, to_cleanup))

        run()
        print("fuzz outcomes", outcomes, "booked", len(booked_ok))
        state = loop.run_until_complete(scheduler_state(nc, "fuzz"))
        assert state.bookings == [], state.bookings
        assert len(booked_ok) >= 10 and outcomes.get("invalid_request", 0) >= 10, (outcomes, len(booked_ok))
        for name, proc in stack["procs"].items():
            assert proc.proc is not None and proc.proc.poll() is None, f"{name} died"
            assert proc.readyz()["_http_status"] == 200
        metrics = stack["procs"]["epp-bridge"].metrics()
        assert 'kvr_epp_queries_total{mode="auto",outcome="ok",routed="aggregated"}' in metrics
        assert 'kvr_requests_total{endpoint="epp.query",outcome="invalid_request"}' in metrics
    finally:
        loop.run_until_complete(nc.close())
        loop.close()
