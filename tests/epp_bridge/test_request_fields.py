"""Issue 18, request path, end to end on a real nats-server: the bridge (one process: embedded
scheduler and index replica, ext_proc port) honours the request fields Dynamo and GAIE send, over
epp.query and ext_proc alike, and books through the split API (epp.book)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from schemas import codec
from schemas.subjects import Names
from services.epp_bridge.extproc_client import ExtProcClient
from services.runtime.embedded import free_port

from .helpers import eventually, record, register, start_bridge

NAMES = Names()
POOL = "p"
TOKENS = list(range(500, 532))  # 8 blocks of 4


async def ask(nc, subject: str, payload: dict) -> dict:
    msg = await nc.request(subject, codec.encode_json(payload), timeout=10)
    return msgspec.json.decode(msg.data)


def body(**nvext) -> dict:
    return {"prompt": "", "nvext": {"token_data": TOKENS, **nvext}}


@pytest.fixture
async def bridge(nc, nats_url):
    port = free_port()
    app = await start_bridge(nc, nats_url, "--pool", POOL, "--epp-embedded-scheduler", "--embedded-indexer", "--block-size", "4",
                             "--grpc-port", str(port), "--grpc-host", "127.0.0.1")
    await register(nc, [
        record(1, role="prefill", address="10.0.0.1", port=8000),
        record(2, role="decode", address="10.0.0.2", port=8000, taints=["z=a"]),
        record(3, role="aggregated", address="10.0.0.3", port=9000, dp_size=2, dp_ports=[9000, 9001]),
    ])
    scheduler = app.link.app
    async def up() -> bool:
        return len(scheduler.candidates(POOL)) == 4 and app.ready()

    try:
        await eventually(up)
        app.grpc_target = f"127.0.0.1:{port}"
        yield app
    finally:
        await app.stop()


def booked(app, rid: str) -> bool:
    return app.link.app.states[POOL].tracker.is_active(rid)


async def test_fallback_dp_rank_and_taint_errors_over_epp_query(nc, bridge):
    # Offered only decode/aggregated pods: routed aggregated instead of failing (Dynamo's profile handler).
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "f-1", "body": body(), "book": False,
                                              "pods": [{"address": "10.0.0.3", "port": 9001}]})
    assert r["status"] == "ok" and r["mode"] == "aggregated", r
    # dp rank: only 10.0.0.3:9001 offered → rank 1 and exactly that endpoint.
    assert (r["decode"]["worker_id"], r["decode"]["dp_rank"], r["headers"]["x-gateway-destination-endpoint"]) == (3, 1, "10.0.0.3:9001")
    # A required taint no prefill worker carries: aggregated on the decode worker that has it.
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "f-2", "body": body(routing_constraints={"required_taints": ["z=a"]}),
                                              "book": False})
    assert r["status"] == "ok" and r["mode"] == "aggregated" and r["decode"]["worker_id"] == 2, r
    # ... and in explicit disaggregated mode it is the taint's error, not no_workers.
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "f-3", "body": body(routing_constraints={"required_taints": ["z=a"]}),
                                              "mode": "disaggregated", "book": False})
    assert r["status"] == "error" and r["error"]["code"] == "constraints_unsatisfied", r
    # Invalid constraints are invalid_request with the field.
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "f-4", "body": body(routing_constraints={"preferred_taints": {"z=a": 5.0}})})
    assert r["status"] == "error" and r["error"]["code"] == "invalid_request" and "preferred_taints" in r["error"]["path"], r
    assert not booked(bridge, "f-4")


async def test_pin_headers_nvext_pins_and_query_instance_id_over_epp_query(nc, bridge):
    # Header pins win over nvext (Dynamo's frontend), and are validated.
    q = {"request_id": "h-1", "body": body(backend_instance_id=2), "book": False,
         "headers": {"x-worker-instance-id": "3", "x-dp-rank": "1"}}
    r = await ask(nc, NAMES.epp_query(POOL), q)
    assert (r["decode"]["worker_id"], r["decode"]["dp_rank"]) == (3, 1), r
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-2", "body": body(prefill_worker_id=1, decode_worker_id=2), "book": False})
    assert r["mode"] == "disaggregated" and (r["prefill"]["worker_id"], r["decode"]["worker_id"]) == (1, 2), r
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-3", "body": body(), "headers": {"x-prefill-instance-id": "77"}})
    assert r["status"] == "error" and r["error"]["code"] == "not_found" and "77" in r["error"]["message"], r
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-4", "body": body(), "headers": {"x-worker-instance-id": "x"}})
    assert r["error"]["code"] == "invalid_request" and r["error"]["path"] == "$.headers.x-worker-instance-id", r
    assert not any(booked(bridge, f"h-{i}") for i in range(1, 5))
    # query_instance_id: the worker ids, nothing booked (Dynamo's query is read-only), even with book: true.
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-5", "body": body(annotations=["query_instance_id"]), "book": True})
    assert r["status"] == "ok" and r["booking_id"] == "" and r["decode"]["worker_id"] in (2, 3), r
    assert not booked(bridge, "h-5")
    # The other Dynamo fields are accepted: overrides within bounds, strict priority, enable_local_updates.
    fields = {"router_config_override": {"overlap_score_credit": 0.5, "router_temperature": 0.0},
              "agent_hints": {"strict_priority": 2, "priority": 1}, "enable_local_updates": False}
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-6", "body": body(**fields)})
    assert r["status"] == "ok" and r["booking_id"] and booked(bridge, "h-6"), r
    r = await ask(nc, NAMES.epp_query(POOL), {"request_id": "h-7", "body": body(router_config_override={"router_temperature": 1e9})})
    assert r["error"]["code"] == "invalid_request" and "router_config_override" in r["error"]["path"], r


async def test_split_api_books_the_chosen_targets_with_the_same_checks(nc, bridge):
    # Score read-only, pick elsewhere, then book the pick.
    dry = await ask(nc, NAMES.epp_query(POOL), {"request_id": "s-1", "body": body(), "book": False, "mode": "aggregated"})
    assert dry["booking_id"] == "" and not booked(bridge, "s-1")
    r = await ask(nc, NAMES.epp_book(POOL), {"request_id": "s-1", "body": body(), "decode": {"worker_id": 3, "dp_rank": 1}})
    assert r["status"] == "ok" and r["booking_id"] and (r["decode"]["worker_id"], r["decode"]["dp_rank"]) == (3, 1), r
    assert r["headers"]["x-gateway-destination-endpoint"] == "10.0.0.3:9001"
    assert booked(bridge, "s-1")
    # Disaggregated: both legs pinned and booked.
    r = await ask(nc, NAMES.epp_book(POOL), {"request_id": "s-2", "body": body(), "decode": {"worker_id": 2},
                                             "prefill": {"worker_id": 1}})
    assert r["status"] == "ok" and r["mode"] == "disaggregated" and r["headers"]["x-prefill-instance-id"] == "1", r
    legs = {leg.leg: leg.target for leg in bridge.link.app.states[POOL].tracker.legs_of("s-2")}
    assert legs == {"prefill": (1, 0), "": (2, 0)}
    # Dead/unknown, wrong rank, wrong role, not offered, a taint it lacks: structured errors, nothing booked.
    for rid, extra, code in [
        ("x-1", {"decode": {"worker_id": 99}}, "not_found"),
        ("x-2", {"decode": {"worker_id": 3, "dp_rank": 5}}, "not_found"),
        ("x-3", {"decode": {"worker_id": 1}}, "not_found"),  # a prefill worker as the aggregated target
        ("x-4", {"decode": {"worker_id": 2}, "prefill": {"worker_id": 3}}, "not_found"),
        ("x-5", {"decode": {"worker_id": 3}, "pods": [{"address": "10.0.0.2", "port": 8000}]}, "no_workers"),
        ("x-6", {"decode": {"worker_id": 3}, "body": body(routing_constraints={"required_taints": ["z=a"]})}, "constraints_unsatisfied"),
    ]:
        payload = {"request_id": rid, "body": body(), **extra}
        r = await ask(nc, NAMES.epp_book(POOL), payload)
        assert r["status"] == "error" and r["error"]["code"] == code, (rid, r)
        assert not booked(bridge, rid)
    state = bridge.link.app.export_state(POOL)
    assert sorted(state.bookings) == ["s-1", "s-2"]
    # Cleanup frees a split-API booking like any other.
    assert (await ask(nc, NAMES.epp_cleanup(POOL), {"request_id": "s-1", "phase": "free"}))["known"]


async def test_ext_proc_honours_pin_headers_and_answers_query_instance_id(bridge):
    async with ExtProcClient(bridge.grpc_target) as client:
        d = await client.lifecycle(json.dumps(body()).encode(), headers={"x-worker-instance-id": "3", "x-dp-rank": "1"})
        assert d.routed and d.destination and d.destination.split(",")[0] == "10.0.0.3:9001", d
        assert d.headers["x-worker-instance-id"] == "3" and d.headers["x-dp-rank"] == "1"
        d = await client.lifecycle(json.dumps(body(annotations=["query_instance_id"])).encode())
        assert d.status == 200 and d.error is not None, d
        ids = d.error["nvext"]["worker_id"]
        assert ids["decode_worker_id"] in (2, 3) and "decode_dp_rank" in ids
        d = await client.lifecycle(json.dumps(body()).encode(), headers={"x-worker-instance-id": "99"})
        assert d.status == 404 and d.error["error"]["code"] == "not_found", d
    await asyncio.sleep(0.2)
    assert bridge.link.app.export_state(POOL).bookings == []  # routed ones freed at end of stream; the rest never booked


async def test_a_busy_pool_answers_429_with_a_retry_hint_on_both_entry_points(nc, nats_url):
    """GAIE's saturation answer (429) after Dynamo's queue deadline, with the hint a client can
    honour: `retry_after_s` in the epp.query error, `Retry-After` over ext_proc."""
    port = free_port()
    app = await start_bridge(nc, nats_url, "--pool", "q", "--epp-embedded-scheduler", "--embedded-indexer", "--block-size", "4",
                             "--grpc-port", str(port), "--grpc-host", "127.0.0.1", "--queue-timeout-s", "0.3",
                             "--queue-retry-after-s", "2")
    try:
        await register(nc, [record(1, pool="q", address="10.0.0.1", port=8000, total_kv_blocks=8)])

        async def up() -> bool:
            return len(app.link.app.candidates("q")) == 1 and app.ready()

        await eventually(up)
        first = await ask(nc, NAMES.epp_query("q"), {"request_id": "b-1", "body": body()})  # 8 blocks of 8: busy now
        assert first["status"] == "ok", first
        other = {"prompt": "", "nvext": {"token_data": list(range(9000, 9032))}}
        r = await ask(nc, NAMES.epp_query("q"), {"request_id": "b-2", "body": other})
        assert r["status"] == "error" and r["error"]["code"] == "overloaded" and r["error"]["retry_after_s"] == 2.0, r
        async with ExtProcClient(f"127.0.0.1:{port}") as client:
            d = await client.lifecycle(json.dumps(other).encode())
        assert d.status == 429 and d.headers.get("retry-after") == "2" and d.error["error"]["retry_after_s"] == 2.0, d
        assert app.link.app.export_state("q").bookings == ["b-1"]
    finally:
        await app.stop()
