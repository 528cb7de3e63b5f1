"""Every wire message round-trips in JSON and msgpack; wrong shapes fail with a field path."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest

import schemas
from schemas import codec
from schemas.api import ErrorCode
from schemas.export import MESSAGES, render_all, stale_files
from schemas.openai import ChatMessage, ContentPart, NvExt, OpenAiBody
from schemas.worker import GenerateDone, GenerateRequest

SAMPLES = {
    "RouterEvent": schemas.stored_event(7, 42, [(1111, 16863443419780771464), (2222, 2287610619914608821)]),
    "RouterEventBatch": [schemas.removed_event(7, 43, [2222]), schemas.cleared_event(7, 44, dp_rank=1)],
    "WorkerRecord": schemas.WorkerRecord(
        worker_id=7, pool="llama", pod_name="vllm-0", address="10.0.0.7", port=8000, dp_size=2, dp_ports=[8000, 8001],
        taints=["gpu=h100"], labels={"app": "vllm"}, heartbeat_ms=1763800000000,
    ),
    "LoadReport": schemas.LoadReport(worker_id=7, active_decode_blocks=10, ts_ms=5),
    "BookingEvent": schemas.BookingAdd(
        request_id="r-1", router_id="sched-a", pool="llama", worker_id=7, isl_tokens=1234, overlap_blocks=10,
        sequence_hashes=[1, 2, 3], expected_output_tokens=200, ts_ms=1,
    ),
    "MatchRequest": schemas.MatchRequest(token_ids=[1, 2, 3], lora_name="a"),
    "MatchReply": schemas.MatchReply(
        block_size=16, scores=[schemas.WorkerScore(7, 0, 12)], tier_scores={"host_pinned": []},
        tree_sizes=[schemas.WorkerScore(7, 0, 900)], stream_seq=123456,
    ),
    "DumpRequest": schemas.DumpRequest(),
    "DumpReply": schemas.DumpReply(stream_seq=3, events=[schemas.stored_event(1, 0, [(5, 6)])]),
    "SelectRequest": schemas.SelectRequest(
        request_id="r-1", token_ids=[1, 2], allowed_worker_ids=[7, 9],
        routing_constraints=schemas.RoutingConstraints(required_taints=["zone=a"], preferred_taints={"gpu=h100": 0.5}),
        overrides=schemas.Overrides(overlap_score_credit=1.0, temperature=0.0), expected_output_tokens=200,
    ),
    "SelectReply": schemas.SelectReply(
        decode=schemas.Target(7, 0, "vllm-0", "10.0.0.7:8000"), prefill=None, overlap_blocks=10, isl_tokens=1234,
        block_size=16, cost=12.5,
    ),
    "StateRequest": schemas.StateRequest(),
    "StateReply": schemas.StateReply(
        router_id="a", stream_seq=1, loads=[schemas.WorkerLoad(7, 0, 10, 2, 1)], bookings=["r-1"], workers=[7]
    ),
    "EppQueryRequest": schemas.EppQueryRequest(
        request_id="r-1", body={"model": "llama", "messages": [{"role": "user", "content": "hi"}]},
        pods=[schemas.EppPod(name="vllm-0", address="10.0.0.7", port=8000)],
    ),
    "EppQueryReply": schemas.EppQueryReply(
        request_id="r-1", decode=schemas.Target(7, 0), prefill=None, overlap_blocks=0, isl_tokens=3, block_size=16,
        cost=1.0, headers={"x-worker-instance-id": "7"},
    ),
    "EppBookRequest": schemas.api.EppBookRequest(
        request_id="r-1", body={"prompt": [1, 2, 3]}, decode=schemas.api.EppBookTarget(7, 1),
        prefill=schemas.api.EppBookTarget(9), pods=[schemas.EppPod(address="10.0.0.7", port=8001)],
    ),
    "CleanupRequest": schemas.CleanupRequest(request_id="r-1", phase="free"),
    "CleanupReply": schemas.CleanupReply(request_id="r-1", known=False),
    "ErrorReply": codec.error_reply(ErrorCode.INVALID_REQUEST, "bad", "$.x"),
    "EppQueryBody": OpenAiBody(
        model="llama", messages=[ChatMessage(role="user", content=[ContentPart(type="text", text="hi")])],
        nvext=NvExt(token_data=[1, 2, 3], cache_salt="s"),
    ),
    "GenerateRequest": GenerateRequest(request_id="r-1", token_ids=[1, 2, 3], max_tokens=4),
    "GenerateProgress": GenerateDone(
        request_id="r-1", worker_id=7, prompt_tokens=3, cached_tokens=0, output_tokens=4, ttft_ms=20.0, e2e_ms=50.0
    ),
}


def test_every_exported_message_has_a_sample():
    assert set(SAMPLES) >= set(MESSAGES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("ctype", [None, codec.MSGPACK])
def test_round_trip(name, ctype):
    obj = SAMPLES[name]
    type_ = MESSAGES.get(name, type(obj))
    data = codec.encode(obj, ctype)
    assert codec.decode(data, type_, ctype) == obj


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_json_schema_accepts_sample(name):
    schema = json.loads(render_all()[f"{name}.json"])
    jsonschema.validate(json.loads(codec.encode_json(SAMPLES[name])), schema)


def test_committed_json_schemas_are_current():
    assert stale_files() == []


def test_unknown_extra_fields_are_ignored():
    raw = json.loads(codec.encode_json(SAMPLES["RouterEvent"]))
    raw["future_field"] = {"x": 1}
    raw["event"]["data"]["stored"]["blocks"][0]["mm_future"] = 3
    event = codec.decode(json.dumps(raw).encode(), schemas.RouterEvent)
    assert event.event.data.stored.blocks[0].block_hash == 1111


def test_negative_hashes_are_reinterpreted_as_u64():
    data = b'{"worker_id":1,"event":{"event_id":1,"data":{"removed":{"block_hashes":[-1]}}}}'
    event = codec.decode(data, schemas.RouterEvent)
    assert event.event.data.removed.block_hashes == [2**64 - 1]
    assert codec.decode(b'{"block_hashes":[-2]}', schemas.MatchRequest).block_hashes == [2**64 - 2]


@pytest.mark.parametrize(
    ("type_", "payload", "path"),
    [
        (schemas.RouterEvent, b'{"worker_id":"7","event":{"event_id":1,"data":"cleared"}}', "$.worker_id"),
        (schemas.RouterEvent, b'{"worker_id":7,"event":{"event_id":1,"data":"wiped"}}', "$.event.data"),
        (schemas.RouterEvent, b'{"worker_id":7,"event":{"event_id":-1,"data":"cleared"}}', "$.event.event_id"),
        (schemas.RouterEvent, b'{"worker_id":9007199254740992,"event":{"event_id":1,"data":"cleared"}}', "$.worker_id"),
        (schemas.MatchRequest, b'{"token_ids":[1,-2]}', "$.token_ids[1]"),
        (schemas.MatchRequest, b'{"token_ids":[1], "block_hashes":[2]}', "$"),
        (schemas.SelectRequest, b'{"request_id":"r","token_ids":[1],"overrides":{"temperature":NaN}}', None),
        (schemas.SelectRequest, b'{"request_id":"r","token_ids":[1],"overrides":{"temperature":1e999}}', "$.overrides.temperature"),
        (schemas.SelectRequest, b'{"request_id":"r","token_ids":[1],"mode":"fast"}', "$.mode"),
        (schemas.CleanupRequest, b'{"request_id":"r","phase":"done"}', "$.phase"),
        (schemas.EppQueryRequest, b'{"request_id":"r","body":[]}', "$.body"),
        (schemas.WorkerRecord, b'{"worker_id":1,"pool":"bad pool!"}', "$.pool"),
        (schemas.BookingEvent, b'{"type":"teleport","request_id":"r","router_id":"a","pool":"p"}', "$.type"),
    ],
)
def test_wrong_shapes_raise_schema_error_with_path(type_, payload, path):
    with pytest.raises(codec.SchemaError) as err:
        codec.decode(payload, type_)
    assert err.value.code == "invalid_request"
    if path is not None:
        assert err.value.path == path


def test_huge_arrays_are_rejected():
    payload = codec.encode_msgpack({"token_ids": list(range(3_000_000))})
    with pytest.raises(codec.SchemaError) as err:
        codec.decode(payload, schemas.MatchRequest, codec.MSGPACK)
    assert err.value.path == "$.token_ids"


def test_malformed_msgpack():
    with pytest.raises(codec.SchemaError, match="malformed msgpack"):
        codec.decode(b"\xc1\xc1", schemas.MatchRequest, codec.MSGPACK)


def test_decode_reply_raises_remote_error():
    data = codec.encode_json(codec.error_reply("no_workers", "none live"))
    with pytest.raises(codec.RemoteError) as err:
        codec.decode_reply(data, schemas.SelectReply)
    assert err.value.code == "no_workers"
    assert msgspec.json.decode(data)["status"] == "error"


def test_worker_record_endpoints():
    rec = SAMPLES["WorkerRecord"]
    assert rec.endpoint(1) == "10.0.0.7:8001"
    assert list(rec.dp_ranks) == [0, 1]
    with pytest.raises(codec.SchemaError, match="dp_ports"):
        codec.decode(b'{"worker_id":1,"pool":"p","dp_size":2,"dp_ports":[1]}', schemas.WorkerRecord)


# --- issue 18: routing constraints validated as Dynamo validates them ---------------------------


@pytest.mark.parametrize(
    "constraints, needle",
    [
        ({"preferred_taints": {"gpu": 5.0}}, "preferred_taints"),
        ({"preferred_taints": {"gpu": 7.5}}, "preferred_taints"),
        ({"preferred_taints": {"gpu": -1.0}}, "preferred_taints"),
        ({"preferred_taints": {"gpu": 1.0}}, "preferred_taints"),
        ({"required_taints": [" zone=a"]}, "trimmed"),
        ({"required_taints": ["zone=a "]}, "trimmed"),
        ({"preferred_taints": {"gpu ": 0.5}}, "trimmed"),
        ({"required_taints": ["zone=a", "zone=a"]}, "duplicate"),
        ({"required_taints": [""]}, "required_taints"),
    ],
)
def test_routing_constraints_are_validated_as_dynamo_does(constraints, needle):
    """Dynamo's RoutingConstraints validation: taints non-empty and trimmed, required taints not
    duplicated; weights are a tanh bias in (−1, 1). Before: 5.0 and untrimmed taints were accepted
    (and then matched nothing)."""
    body = schemas.codec.encode_json({"request_id": "r", "token_ids": [1], "routing_constraints": constraints})
    with pytest.raises(schemas.codec.SchemaError) as err:
        schemas.codec.decode(body, schemas.SelectRequest)
    text = f"{err.value.message} {err.value.path}"
    assert needle in text and err.value.path and err.value.path.startswith("$.routing_constraints")
    ok = {"required_taints": ["zone=a"], "preferred_taints": {"gpu": 0.99, "zone=b": -0.99}}
    req = schemas.codec.decode(schemas.codec.encode_json({"request_id": "r", "token_ids": [1], "routing_constraints": ok}),
                               schemas.SelectRequest)
    assert req.routing_constraints is not None and req.routing_constraints.preferred_taints["gpu"] == 0.99
