"""Issue #14 acceptance: the EPP bridge as a GAIE endpoint picker over Envoy ext_proc (gRPC).

Real nats-server, real `kvr indexer`, `kvr scheduler` and three EPP bridge processes, driven by the
project's ext_proc client (Envoy's generated protos, the message order of Envoy's filter):

* bridge A: started with the issue's command, `python -m services.epp_bridge --nats-url URL --pool P
  --http-port 0 --grpc-port N` (readiness seen through gRPC health only);
* bridge B: the same pool over TLS (the second replica of the two-replica test);
* bridge C: pool `lab` over mTLS, with a label filter.
Each test uses its own token range and request ids; bookings are checked through scheduler.state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter

import grpc
import msgspec
import nats
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from schemas import codec
from schemas.api import MatchReply, MatchRequest, StateReply, StateRequest
from schemas.events import kv_msg_id
from schemas.subjects import Names
from services.epp_bridge import extproc_protocol as xp
from services.epp_bridge.extproc_client import ExtProcClient
from services.runtime.embedded import NatsServer, free_port
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request

from .certs import make_pki
from .helpers import record, register, stored_events

NAMES = Names()
BLOCK = 4
POOL = "xp"
LAB = "lab"
pytestmark = pytest.mark.integration

# pool xp: workers 1-3 (one rank each), worker 4 with two dp ranks on their own ports
XP_WORKERS = [record(w, POOL, block_size=BLOCK) for w in (1, 2, 3)] + [
    record(4, POOL, block_size=BLOCK, dp_size=2, dp_ports=[8001, 8002], address="10.0.0.4")
]
# pool lab: the filter `tier=gold|silver` + `zone?=a` lets only 11 and 15 through
LAB_WORKERS = [
    record(11, LAB, block_size=BLOCK, labels={"tier": "gold"}),
    record(12, LAB, block_size=BLOCK, labels={"tier": "bronze"}),
    record(13, LAB, block_size=BLOCK, labels={}),  # no tier label: fails (tier is not optional)
    record(14, LAB, block_size=BLOCK, labels={"tier": "gold", "zone": "b"}),
    record(15, LAB, block_size=BLOCK, labels={"tier": "silver", "zone": "a"}),
]


def _wait_health(target: str, pki=None, mtls: bool = False, timeout: float = 60.0) -> None:
    async def probe() -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            client = _client(target, pki, mtls)
            try:
                if await client.health("readiness", timeout=1.0) == "SERVING":
                    return
            except grpc.aio.AioRpcError:
                pass
            finally:
                await client.close()
            assert asyncio.get_running_loop().time() < deadline, f"{target} not SERVING in {timeout}s"
            await asyncio.sleep(0.1)

    asyncio.run(probe())


def _client(target: str, pki=None, mtls: bool = False) -> ExtProcClient:
    if pki is None:
        return ExtProcClient(target)
    if mtls:
        return ExtProcClient(target, ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), server_name="localhost")
    return ExtProcClient(target, ca=str(pki.ca), server_name="localhost")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("extproc-stack")
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = NatsServer().start()
    procs: dict[str, ServiceProcess] = {}
    raw: subprocess.Popen[bytes] | None = None
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}
    try:
        for name, command, pools, extra in (
            ("indexer", "indexer", (POOL, LAB), []),
            # Dynamo's cost rule: the load-spreading counts below were calibrated on it (the kvr
            # rule keeps more of a shared-prefix burst on the prefix worker: 8 of 20 there, measured).
            ("scheduler", "scheduler", (POOL, LAB), ["--block-size", str(BLOCK), "--seed", "1", "--embedded-indexer", "false",
                                                    "--cost-rule", "dynamo", "--trace-file", str(logs / "scheduler.spans")]),
            ("b", "epp-bridge", (POOL,), ["--grpc-port", str(ports["b"]), "--grpc-host", "127.0.0.1",
                                         "--grpc-tls-cert", str(pki.server_cert), "--grpc-tls-key", str(pki.server_key),
                                         "--trace-file", str(logs / "b.spans")]),
            ("c", "epp-bridge", (LAB,), ["--grpc-port", str(ports["c"]), "--grpc-host", "127.0.0.1",
                                         "--grpc-tls-cert", str(pki.server_cert), "--grpc-tls-key", str(pki.server_key),
                                         "--grpc-tls-client-ca", str(pki.ca),
                                         "--epp-label-filter", f"{LAB}:tier=gold|silver", "--epp-label-filter", f"{LAB}:zone?=a"]),
        ):
            procs[name] = ServiceProcess(command, extra, nats_url=server.url, pools=pools, log_path=str(logs / f"{name}.log")).start()
        # Bridge A: the command line, exactly.
        with open(logs / "a.log", "ab") as out:
            raw = subprocess.Popen(
                [sys.executable, "-m", "services.epp_bridge", "--nats-url", server.url, "--pool", POOL,
                 "--http-port", "0", "--grpc-port", str(ports["a"])],
                stdout=out, stderr=out, start_new_session=True,
            )
        for proc in procs.values():
            proc.wait_ready(60)
        _wait_health(f"127.0.0.1:{ports['a']}")
        _wait_health(f"127.0.0.1:{ports['b']}", pki)
        _wait_health(f"127.0.0.1:{ports['c']}", pki, mtls=True)
        yield {"url": server.url, "procs": procs, "raw": raw, "pki": pki, "logs": logs,
               "a": f"127.0.0.1:{ports['a']}", "b": f"127.0.0.1:{ports['b']}", "c": f"127.0.0.1:{ports['c']}"}
    finally:
        if raw is not None:
            raw.terminate()
            try:
                raw.wait(15)
            except subprocess.TimeoutExpired:
                raw.kill()
        for proc in procs.values():
            proc.terminate()
        server.cleanup()


@pytest.fixture
async def conn(stack):
    nc = await nats.connect(stack["url"])
    await register(nc, XP_WORKERS + LAB_WORKERS)
    await wait_known(nc, POOL, {1, 2, 3, 4})
    await wait_known(nc, LAB, {11, 12, 13, 14, 15})
    yield nc
    await nc.close()


@pytest.fixture
async def epp(stack):
    client = ExtProcClient(stack["a"])
    yield client
    await client.close()


async def wait_for(predicate, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def state(nc, pool: str = POOL) -> StateReply:
    return await request(nc, NAMES.scheduler_state(pool), StateRequest(), StateReply)


async def wait_known(nc, pool: str, ids: set[int]) -> None:
    async def seen():
        return ids <= set((await state(nc, pool)).workers)

    await wait_for(seen)


async def wait_no_bookings(nc, pool: str = POOL) -> None:
    async def none_left():
        return not (await state(nc, pool)).bookings

    await wait_for(none_left)


async def publish_cached(nc, pool: str, worker_id: int, tokens: list[int], event_id: int) -> None:
    js = nc.jetstream()
    data = stored_events(worker_id, tokens, BLOCK, event_id=event_id)
    await js.publish(NAMES.kv_subject(pool, worker_id, 0), data, headers={"Nats-Msg-Id": kv_msg_id(pool, worker_id, 0, event_id)})
    want = len(tokens) // BLOCK

    async def indexed():
        reply = await request(nc, NAMES.match(pool), MatchRequest(token_ids=tokens), MatchReply)
        return any(s.worker_id == worker_id and s.blocks == want for s in reply.scores)

    await wait_for(indexed)


def chat(tokens: list[int], **extra) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "nvext": {"token_data": tokens}, **extra}
    return json.dumps(body).encode()


def endpoint(worker_id: int) -> str:
    return f"10.0.0.{worker_id}:8000"


# --- health ----------------------------------------------------------------------------------


async def test_grpc_health_serving_for_the_four_names(stack):
    for target, pki, mtls in ((stack["a"], None, False), (stack["b"], stack["pki"], False), (stack["c"], stack["pki"], True)):
        async with _client(target, pki, mtls) as client:
            for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await client.health(name) == "SERVING", (target, name)
            assert await client.health("no.such.Service") == "SERVICE_UNKNOWN"


# --- routing ---------------------------------------------------------------------------------


async def test_prefix_of_worker_a_routes_there_header_and_metadata_and_chunking_does_not_matter(conn, epp):
    prefix = list(range(1000, 1032))
    await publish_cached(conn, POOL, 1, prefix, event_id=1)
    body = chat(prefix + [5, 6, 7, 8, 9])
    one = await epp.lifecycle(body, chunks=1)
    three = await epp.lifecycle(body, chunks=3)
    for d in (one, three):
        assert d.routed, d.error
        assert d.endpoints[0] == endpoint(1) and d.metadata_destination == d.destination
        assert d.headers["x-worker-instance-id"] == "1" and d.headers["x-dp-rank"] == "0"
        assert d.headers["x-dynamo-routing-mode"] == "aggregated"
        assert d.body == body  # passed on unchanged
        assert len(d.endpoints) == 3 and len(set(d.endpoints)) == 3  # primary + 2 fallbacks
        # GAIE's order in FULL_DUPLEX_STREAMED: the headers answer, then the body as streamed mutations
        assert d.responses[0] == "request_headers" and set(d.responses[1:]) == {"request_body"}
    assert three.destination == one.destination
    await wait_no_bookings(conn)


@pytest.mark.parametrize(
    "kw",
    [
        {"request_mode": xp.STREAMED},  # waits for the headers answer: mode_override → BUFFERED
        {"request_mode": xp.STREAMED, "allow_mode_override": False},  # override refused: chunk by chunk
        {"request_mode": xp.STREAMED, "send_body_without_waiting": True},
        {"request_mode": xp.BUFFERED, "response_mode": xp.BUFFERED},
        {"request_mode": xp.FULL_DUPLEX_STREAMED, "response_mode": xp.NONE},
        {"request_mode": xp.FULL_DUPLEX_STREAMED, "response_mode": xp.STREAMED},
    ],
    ids=["streamed", "streamed-no-override", "streamed-no-wait", "buffered", "duplex-resp-none", "duplex-resp-streamed"],
)
async def test_body_modes_route_the_same_and_free_the_booking(conn, epp, kw):
    prefix = list(range(2000, 2032))
    await publish_cached(conn, POOL, 1, prefix, event_id=2)
    body = chat(prefix + [1, 2, 3])
    decision = await epp.lifecycle(body, chunks=4, **kw)
    assert decision.routed and decision.endpoints[0] == endpoint(1), decision
    assert decision.metadata_destination == decision.destination and decision.body == body
    await wait_no_bookings(conn)


async def test_body_ending_with_trailers_and_a_bodyless_request(conn, epp):
    s = epp.stream()
    decision = await s.request(chat(list(range(2100, 2140))), chunks=2, trailers=True)
    assert decision.routed and decision.responses[-1] == "request_trailers"
    await s.response(trailers=True)
    await s.finish()
    get = await epp.lifecycle(None)  # GET /v1/models: routed on load, nothing booked
    assert get.routed and get.destination and get.responses == ["request_headers"]
    await wait_no_bookings(conn)


async def test_subset_hint_restricts_the_choice_and_names_ranks(conn, epp):
    prefix = list(range(3000, 3032))
    await publish_cached(conn, POOL, 1, prefix, event_id=3)
    body = chat(prefix + [1])
    d = await epp.lifecycle(body, subset=[endpoint(2), "10.9.9.9:8000"])
    assert d.routed and d.endpoints == [endpoint(2)] and d.headers["x-worker-instance-id"] == "2"
    d = await epp.lifecycle(body, subset=["10.0.0.4:8002"])  # rank 1 of worker 4
    assert d.routed and d.destination == "10.0.0.4:8002"
    assert (d.headers["x-worker-instance-id"], d.headers["x-dp-rank"]) == ("4", "1")
    for subset in ([], ["10.9.9.9:8000"]):
        d = await epp.lifecycle(body, subset=subset)
        assert d.status == 503 and d.error["error"]["code"] == "no_workers", d
        assert d.headers["content-type"] == "application/json"
    await wait_no_bookings(conn)


async def test_bad_requests_get_an_immediate_response_and_nothing_is_booked(stack, conn, epp):
    cases = {
        b'{"messages": [': (400, "invalid_request"),
        b'{"messages": "hi"}': (400, "invalid_request"),
        b'{"prompt": "x", "nvext": {"token_data": [1, -2]}}': (400, "invalid_request"),
        b"   ": (400, "invalid_request"),
        b'{"model": "m"}': (400, "invalid_request"),
        json.dumps({"prompt": [1] * 300_000}).encode(): (400, "invalid_request"),  # 1.5 MB > 1 MiB
        b'{"prompt": "text but no tokenizer"}': (400, "invalid_request"),
    }
    for body, (status, code) in cases.items():
        d = await epp.lifecycle(body, chunks=3)
        assert (d.status, d.error["error"]["code"]) == (status, code), (body[:40], d)
    d = await epp.lifecycle(b'{"messages": "hi"}')
    assert d.error["error"]["path"].startswith("$.messages")
    # an unknown message (no request phase set) ends the stream with a 400, not a hang
    s = epp.stream()
    await s.send_raw(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    await s.send_raw(pb.ProcessingRequest())
    resp = await s.read_raw()
    assert resp.immediate_response.status.code == 400
    await s.finish()
    # a stream closed in the middle of the body: nothing routed, nothing booked, server fine
    s = epp.stream()
    await s.send_raw(pb.ProcessingRequest(request_headers=pb.HttpHeaders()))
    await s.send_raw(pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"prompt": [1, 2', end_of_stream=False)))
    s.cancel()
    d = await epp.lifecycle(chat(list(range(3100, 3120))))
    assert d.routed
    await wait_no_bookings(conn)
    assert stack["raw"].poll() is None


# --- bookings --------------------------------------------------------------------------------


async def hold_open(client: ExtProcClient, body: bytes):
    s = client.stream()
    decision = await s.request(body, chunks=2)
    assert decision.routed, decision
    return s, decision


async def test_held_open_requests_spread_then_the_longest_prefix_wins_again(conn, epp):
    prefix = list(range(4000, 4032))
    await publish_cached(conn, POOL, 1, prefix, event_id=4)
    held = [await hold_open(epp, chat(prefix + [i] * 32)) for i in range(40)]
    by_worker = Counter(d.headers["x-worker-instance-id"] for _, d in held)
    assert len(by_worker) >= 3 and by_worker["1"] < 20, by_worker
    assert len((await state(conn)).bookings) == 40
    await asyncio.gather(*(s.response() for s, _ in held))
    await asyncio.gather(*(s.finish() for s, _ in held))
    await wait_no_bookings(conn)
    d = await epp.lifecycle(chat(prefix + [7] * 32))
    assert d.endpoints[0] == endpoint(1)


async def test_the_first_response_chunk_completes_prefill_and_the_end_frees(conn, epp):
    s, d = await hold_open(epp, chat(list(range(5500, 5540))))
    target = (int(d.headers["x-worker-instance-id"]), int(d.headers["x-dp-rank"]))

    async def load():
        st = await state(conn)
        return next(((ld.active_prefill_tokens, ld.active_requests) for ld in st.loads if (ld.worker_id, ld.dp_rank) == target), None)

    assert (await load())[0] > 0  # 40 prompt tokens, nothing cached: prefill pending
    await s.response([b"data: first token\n\n"], end=False)

    async def prefilled():
        return await load() == (0, 1)

    await wait_for(prefilled)
    await s.finish()  # the stream ends (the gateway closes it after the response)
    await wait_no_bookings(conn)


async def test_a_stream_cancelled_before_the_response_frees_its_booking(conn, epp):
    s, d = await hold_open(epp, chat(list(range(5000, 5040))))
    assert len((await state(conn)).bookings) == 1
    s.cancel()
    await wait_no_bookings(conn)


async def test_a_fallback_that_served_the_request_takes_over_the_booking(conn, epp):
    s, d = await hold_open(epp, chat(list(range(6000, 6040))))
    primary, fallback = d.endpoints[0], d.endpoints[1]
    await s.response([b"data: 1\n\n"], served=fallback, end=False)  # first token streamed: still booked
    targets = {(r.worker_id, rank): r.endpoint(rank) for r in XP_WORKERS for rank in r.dp_ranks}
    fallback_target = next(t for t, ep in targets.items() if ep == fallback)
    assert targets[(int(d.headers["x-worker-instance-id"]), int(d.headers["x-dp-rank"]))] == primary != fallback

    async def moved():
        st = await state(conn)
        return {(load.worker_id, load.dp_rank) for load in st.loads if load.active_requests} == {fallback_target}

    await wait_for(moved)
    await s.finish()
    await wait_no_bookings(conn)


async def test_two_replicas_alternating_see_each_others_bookings(stack, conn, epp):
    prefix = list(range(7000, 7032))
    await publish_cached(conn, POOL, 1, prefix, event_id=7)
    async with _client(stack["b"], stack["pki"]) as other:
        held = [await hold_open(epp if i % 2 == 0 else other, chat(prefix + [i] * 32)) for i in range(20)]
        by_worker = Counter(d.headers["x-worker-instance-id"] for _, d in held)
        # Blind to each other, each replica would send its half to the prefix worker (≥ 10 there).
        assert len(by_worker) >= 3 and by_worker["1"] < 8, by_worker
        for s, _ in held:
            s.cancel()
    await wait_no_bookings(conn)


async def test_the_gateways_traceparent_is_continued_through_ext_proc_into_the_scheduler(stack, conn):
    """An HTTP `traceparent` reaches the bridge in ext_proc request headers (any case): the decision
    is a SERVER span of that trace, and the select crosses into the scheduler as CLIENT → SERVER."""
    trace_id, gateway_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with _client(stack["b"], stack["pki"]) as client:
        decision = await client.lifecycle(chat(list(range(9000, 9040))), headers={"TraceParent": f"00-{trace_id}-{gateway_span}-01"})
    assert decision.routed

    def spans(name: str) -> list[dict]:
        path = stack["logs"] / f"{name}.spans"
        lines = path.read_text().splitlines() if path.exists() else []
        return [span for span in map(json.loads, lines) if span["trace_id"] == trace_id]

    async def traced():
        bridge, sched = spans("b"), spans("scheduler")
        return (bridge, sched) if any(s["name"] == "scheduler.select" for s in sched) else None

    bridge, sched = await wait_for(traced)
    (decide,) = [s for s in bridge if s["name"] == "ext_proc.decide"]
    assert decide["kind"] == "SERVER" and decide["parent_span_id"] == gateway_span
    (call,) = [s for s in bridge if s["kind"] == "CLIENT" and s["parent_span_id"] == decide["span_id"]]
    (select,) = [s for s in sched if s["name"] == "scheduler.select"]
    assert select["kind"] == "SERVER" and select["parent_span_id"] == call["span_id"]
    await wait_no_bookings(conn)


# --- TLS, mTLS, label filter -----------------------------------------------------------------


async def test_tls_refuses_plaintext_and_unknown_cas_and_mtls_needs_a_client_certificate(stack):
    pki = stack["pki"]
    async with ExtProcClient(stack["b"]) as plain:  # plaintext to a TLS port
        with pytest.raises(grpc.aio.AioRpcError):
            await plain.health("readiness", timeout=2)
    async with ExtProcClient(stack["b"], ca=str(pki.other_ca), server_name="localhost") as wrong_ca:
        with pytest.raises(grpc.aio.AioRpcError):
            await wrong_ca.health("readiness", timeout=2)
    async with _client(stack["c"], pki, mtls=False) as no_cert:  # mTLS port, no client certificate
        with pytest.raises(grpc.aio.AioRpcError):
            await no_cert.health("readiness", timeout=2)
    async with _client(stack["c"], pki, mtls=True) as ok:
        assert await ok.health("readiness") == "SERVING"


async def test_label_filter_applies_to_ext_proc_and_epp_query(stack, conn):
    prefix = list(range(8000, 8032))
    await publish_cached(conn, LAB, 12, prefix, event_id=8)  # the cache is on a filtered-out worker
    eligible = {endpoint(11), endpoint(15)}
    async with _client(stack["c"], stack["pki"], mtls=True) as client:
        seen = set()
        for i in range(6):
            d = await client.lifecycle(chat(prefix + [i]))
            assert d.routed and set(d.endpoints) <= eligible, d
            seen.add(d.endpoints[0])
        d = await client.lifecycle(chat(prefix), subset=[endpoint(12), endpoint(13)])
        assert d.status == 503 and d.error["error"]["code"] == "no_workers"
    for i in range(4):
        payload = {"request_id": f"lf-{i}", "body": {"prompt": prefix + [i]}, "book": False}
        msg = await conn.request(NAMES.epp_query(LAB), codec.encode_json(payload), timeout=10)
        reply = msgspec.json.decode(msg.data)
        assert reply["status"] == "ok" and reply["headers"]["x-gateway-destination-endpoint"] in eligible, reply
    await wait_no_bookings(conn, LAB)


# --- operator client -------------------------------------------------------------------------


async def test_kvr_epp_extproc_and_health_commands_over_mtls(stack, conn):
    pki = stack["pki"]
    tls = ["--target", stack["c"], "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
           "--server-name", "localhost"]

    async def kvr(*argv: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "epp", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        return proc.returncode, out.decode() + err.decode()

    rc, out = await kvr("health", *tls)
    assert rc == 0 and json.loads(out) == dict.fromkeys(("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"), "SERVING")
    rc, out = await kvr("extproc", *tls, "--token-ids", ",".join(str(t) for t in range(9000, 9040)), "--chunks", "3", "--request-mode", "streamed")
    result = json.loads(out)
    assert rc == 0 and result["routed"] and result["body_unchanged"], out
    assert result["destination"].split(",")[0] in {endpoint(11), endpoint(15)}
    assert result["metadata"]["envoy.lb"]["x-gateway-destination-endpoint"] == result["destination"]
    rc, out = await kvr("extproc", *tls, "--token-ids", "1,2,3,4,5", "--subset", "")
    assert rc == 1 and json.loads(out)["status"] == 503
    rc, out = await kvr("health", "--target", stack["c"], "--timeout", "2")  # plaintext to an mTLS port
    assert rc == 2 and "no answer" in out
    await wait_no_bookings(conn, LAB)


# --- shutdown --------------------------------------------------------------------------------


async def test_sigterm_drains_open_streams_then_frees_their_bookings_and_exits_0(stack, conn):
    port = free_port()
    proc = ServiceProcess("epp-bridge", ["--grpc-port", str(port), "--grpc-host", "127.0.0.1", "--grpc-drain-s", "1"],
                          nats_url=stack["url"], pools=(POOL,), log_path=str(stack["logs"] / "d.log")).start()
    try:
        await asyncio.to_thread(proc.wait_ready, 60)
        async with ExtProcClient(f"127.0.0.1:{port}") as client:
            s, d = await hold_open(client, chat(list(range(9500, 9540))))
            assert len((await state(conn)).bookings) == 1
            proc.proc.send_signal(15)

            async def not_serving():
                try:
                    return await client.health("readiness", timeout=1) != "SERVING"
                except grpc.aio.AioRpcError:
                    return True

            await wait_for(not_serving)  # the gateway stops sending new requests here
            await asyncio.sleep(2)  # past --grpc-drain-s: the stream is cancelled, its booking freed
            with pytest.raises((grpc.aio.AioRpcError, AssertionError, asyncio.InvalidStateError)):
                await s.response(end=False)
                await s.finish()
            await wait_no_bookings(conn)
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        proc.terminate()
