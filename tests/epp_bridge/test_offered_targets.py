"""Issue 18 (request path), pure: the gateway's candidates are (worker, dp rank) targets and the
destination is always an endpoint the gateway offered; request pins from headers and nvext.

The property runs the bridge's own pieces (PodIndex → select_request → the scheduler's Decider →
with_offered → routing headers) without NATS: the same functions `EppBridgeApp.route` chains."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.api import EppPod, EppQueryRequest, Policy, SelectReply
from schemas.discovery import Role, WorkerRecord
from schemas.openai import NvExt, OpenAiBody
from services.epp_bridge.decision import (
    DESTINATION,
    PREFILLER_HOST_PORT,
    Pins,
    RouteAsk,
    destination,
    overrides_of,
    request_pins,
    routing_headers,
    select_request,
    with_offered,
)
from services.epp_bridge.pods import PodIndex
from services.epp_bridge.prompt import prompt_tokens
from services.runtime.responder import ServiceError
from services.scheduler.candidates import candidates_from
from services.scheduler.cost import CostConfig
from services.scheduler.decide import Decider, PoolView
from services.scheduler.load import LoadTracker
from services.scheduler.selector import Overlaps, SelectionError, Selector

pytestmark = pytest.mark.unit


def _record(wid: int, role: Role = "aggregated", dp_size: int = 1, ports: bool = True, taints: tuple[str, ...] = ()) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, pool="p", pod_name=f"vllm-{wid}", address=f"10.0.0.{wid}", port=9000, dp_size=dp_size,
        dp_ports=[9000 + r for r in range(dp_size)] if ports and dp_size > 1 else None, role=role, taints=list(taints),
    )


def _route(records: list[WorkerRecord], pods: list[EppPod] | None, body: OpenAiBody, *, mode: str = "auto",
           endpoints: list[str] | None = None, seed: int = 0) -> tuple[SelectReply, dict[str, str]]:
    """What `EppBridgeApp.route` does around the select, with the scheduler's pure Decider."""
    index = PodIndex(records)
    offer = index.offer(pods, endpoints)
    ask = RouteAsk("r-1", body, pods=pods, endpoints=endpoints, mode=mode, book=False)
    prompt = prompt_tokens(None, body, None, 10_000)
    sreq = select_request(ask, body, prompt, None, index.block_size, allowed_targets=offer.targets)
    decider = Decider(Selector(rng=random.Random(seed)), CostConfig(), router_id="t")
    view = PoolView("p", candidates_from(records), LoadTracker())
    p = decider.prepare(sreq, view)
    out = decider.decide(p, Overlaps(), view, policy=Policy.KV, ts_ms=1, booking_id="")
    reply = with_offered(out.reply, offer.endpoints)
    return reply, routing_headers(reply, pods)


BODY = msgspec.convert({"prompt": list(range(40))}, OpenAiBody)


def test_only_the_offered_rank_is_a_candidate_and_the_destination_is_its_endpoint():
    """The issue's case: offered only 10.0.0.41:9001 (rank 1), the router chose rank 0 and sent
    the gateway to 10.0.0.41:9000, which it had not offered (6 of 6 queries)."""
    records = [_record(41, dp_size=2)]
    pods = [msgspec.convert({"address": "10.0.0.41", "port": 9001}, EppPod)]
    for seed in range(6):
        reply, headers = _route(records, pods, BODY, seed=seed)
        assert (reply.decode.worker_id, reply.decode.dp_rank) == (41, 1)
        assert headers[DESTINATION] == "10.0.0.41:9001" and headers["x-dp-rank"] == "1"


def test_gaie_virtual_rank_pods_and_a_gateway_address_discovery_does_not_know():
    """GAIE's data-parallel virtual pod `<pod>-rank-N` is that rank; a pod named by discovery but
    offered at another address is routed to the offered address (the gateway knows where it sends)."""
    records = [_record(5, dp_size=3)]
    reply, headers = _route(records, [msgspec.convert({"name": "vllm-5-rank-2"}, EppPod)], BODY)
    assert (reply.decode.dp_rank, headers[DESTINATION]) == (2, "10.0.0.5:9002")
    other = msgspec.convert({"name": "vllm-5", "address": "192.168.1.5", "port": 8080}, EppPod)
    reply, headers = _route(records, [other], BODY)
    assert headers[DESTINATION] == "192.168.1.5:8080"
    assert destination(reply) == ["192.168.1.5:8080"]


# --- the property --------------------------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[WorkerRecord], list[EppPod], OpenAiBody, str]:
    n = draw(st.integers(1, 5))
    records = [
        _record(
            wid, draw(st.sampled_from(["aggregated", "prefill", "decode"])), draw(st.integers(1, 3)), draw(st.booleans()),
            tuple(draw(st.sets(st.sampled_from(["z=a", "z=b"]), max_size=2))),
        )
        for wid in range(1, n + 1)
    ]
    every = [(i, rank) for i, r in enumerate(records) for rank in r.dp_ranks]
    chosen = draw(st.lists(st.sampled_from(every), min_size=1, max_size=len(every), unique=True))
    pods = []
    for i, rank in chosen:
        rec = records[i]
        endpoint = rec.endpoint(rank)
        assert endpoint is not None
        address, port = endpoint.rsplit(":", 1)
        shape = draw(st.sampled_from(["endpoint", "named", "virtual"]))
        item: dict[str, object] = {"address": address, "port": int(port)}
        if shape == "named":
            item["name"] = rec.pod_name
        elif shape == "virtual":
            item["name"] = f"{rec.pod_name}-rank-{rank - rec.dp_start_rank}"
        pods.append(msgspec.convert(item, EppPod))
    required = draw(st.sets(st.sampled_from(["z=a", "z=b"]), max_size=1))
    nvext = {"routing_constraints": {"required_taints": sorted(required)}} if required else {}
    body = msgspec.convert({"prompt": list(range(draw(st.integers(1, 64)))), "nvext": nvext}, OpenAiBody)
    mode = draw(st.sampled_from(["auto", "aggregated", "disaggregated"]))
    return records, pods, body, mode


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.integers(0, 3))
def test_destination_endpoint_is_always_one_the_gateway_offered(fleet, seed):
    """GAIE's endpoint picker contract: the picked endpoint (and the fallbacks, and the prefill
    endpoint when disaggregated) is one of the candidates the gateway offered."""
    records, pods, body, mode = fleet
    offered = {p.endpoint for p in pods}
    try:
        reply, headers = _route(records, pods, body, mode=mode, seed=seed)
    except SelectionError:
        return  # nothing eligible among what was offered: a structured error, never another endpoint
    assert headers[DESTINATION] in offered
    assert set(destination(reply)) <= offered
    if reply.prefill is not None:
        assert headers[PREFILLER_HOST_PORT] in offered
    index = PodIndex(records)
    targets = set(index.offer(pods).targets or ())
    assert (reply.decode.worker_id, reply.decode.dp_rank) in targets


# --- pins from headers and nvext (Dynamo's frontend mapping: headers win) -------------------


def test_pin_headers_win_over_nvext_as_in_dynamo():
    nvext = NvExt(backend_instance_id=1, decode_worker_id=2, dp_rank=3, prefill_worker_id=4, prefill_dp_rank=5)
    assert request_pins({}, nvext) == Pins(2, 3, 4, 5)  # decode_worker_id wins over backend_instance_id
    assert request_pins({}, NvExt(backend_instance_id=1)) == Pins(1, None, None, None)
    headers = {"X-Worker-Instance-Id": "7", "x-dp-rank": "1", "x-prefill-instance-id": "8", "x-prefill-dp-rank": "0"}
    assert request_pins(headers, nvext) == Pins(7, 1, 8, 0)
    assert request_pins({"x-data-parallel-rank": "2", "x-worker-instance-id": "7"}, None) == Pins(7, 2, None, None)
    # Dynamo's "unset" prefill rank (u32::MAX), and a rank without its worker, pin nothing.
    assert request_pins({"x-prefill-instance-id": "8", "x-prefill-dp-rank": str((1 << 32) - 1)}, None) == Pins(None, None, 8, None)
    assert request_pins({"x-dp-rank": "1"}, None) == Pins()
    for bad in ({"x-worker-instance-id": "seven"}, {"x-dp-rank": "-1", "x-worker-instance-id": "1"},
                {"x-dp-rank": "70000", "x-worker-instance-id": "1"}, {"x-prefill-instance-id": str(1 << 53)}):
        with pytest.raises(ServiceError) as err:
            request_pins(bad, None)
        assert err.value.code == "invalid_request" and err.value.path and err.value.path.startswith("$.headers.")


def test_router_config_override_maps_to_the_selects_overrides_within_bounds():
    """Dynamo's per-request `router_config_override` (overlap credit, legacy overlap_score_weight,
    prefill load scale, temperature)."""
    nv = msgspec.convert({"router_config_override": {"overlap_score_weight": 0.5, "router_temperature": 0.2}}, NvExt)
    o = overrides_of(nv)
    assert o is not None and (o.overlap_score_credit, o.temperature, o.prefill_load_scale) == (0.5, 0.2, None)
    nv = msgspec.convert({"router_config_override": {"overlap_score_credit": 2.0, "overlap_score_weight": 0.5}}, NvExt)
    assert overrides_of(nv).overlap_score_credit == 2.0
    assert overrides_of(NvExt()) is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"router_config_override": {"router_temperature": 1e6}}, NvExt)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"router_config_override": {"prefill_load_scale": -1}}, NvExt)


def test_select_request_carries_pins_priorities_and_overrides():
    body = msgspec.convert(
        {"prompt": [1, 2, 3], "nvext": {"prefill_worker_id": 4, "agent_hints": {"priority": 3, "strict_priority": 2},
                                        "router_config_override": {"overlap_score_credit": 0.0}, "enable_local_updates": False}},
        OpenAiBody,
    )
    req = msgspec.convert({"request_id": "r", "body": {}, "headers": {"x-worker-instance-id": "9"}}, EppQueryRequest)
    s = select_request(req, body, prompt_tokens(None, body, None, 100), None)
    assert (s.pinned_worker_id, s.pinned_prefill_worker_id, s.priority, s.strict_priority) == (9, 4, 3, 2)
    assert s.overrides is not None and s.overrides.overlap_score_credit == 0.0
    query = msgspec.convert({"prompt": [1], "nvext": {"annotations": ["query_instance_id"]}}, OpenAiBody)
    assert query.nvext is not None and query.nvext.query_instance_id
    assert msgspec.convert({"prompt": [1], "nvext": {"annotations": ["query_instance_id:"]}}, OpenAiBody).nvext.query_instance_id
    assert not msgspec.convert({"prompt": [1], "nvext": {"annotations": ["other"]}}, OpenAiBody).nvext.query_instance_id
