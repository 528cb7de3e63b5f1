"""Pure parts of the ext_proc endpoint picker: booking lifecycle, metadata parsing, modes, label filter."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.epp_bridge import extproc_protocol as xp
from services.epp_bridge.extproc_client import split
from services.epp_bridge.labels import LabelFilter, parse_label_filters
from services.epp_bridge.pods import PodIndex

from .helpers import record

pytestmark = pytest.mark.unit

EVENTS = st.lists(st.sampled_from(["started", "served_a", "served_b", "served_home", "finished"]), max_size=12)


@given(EVENTS, st.booleans())
def test_lifecycle_frees_exactly_once_and_nothing_follows_the_free(events, booked):
    life = xp.BookingLifecycle(booked=booked)
    sent: list[str] = []
    for event in events + ["finished"]:  # the stream always ends, one way or another
        if event == "started":
            sent += life.response_started()
        elif event.startswith("served"):
            target = {"served_a": (2, 0), "served_b": (3, 1), "served_home": (1, 0)}[event]
            sent += life.served_by(target, (1, 0))
        else:
            sent += life.finished()
    if not booked:
        assert sent == []
        return
    assert sent.count("free") == 1 and sent[-1] == "free"
    assert sent.count("prefill_complete") <= 1
    assert sent.count("move") <= 2  # at most once per other target, never to the booked one
    before_end = (events + ["finished"])[: (events + ["finished"]).index("finished")]
    assert ("prefill_complete" in sent) == ("started" in before_end)
    if "prefill_complete" in sent:
        assert sent.index("prefill_complete") < sent.index("free")


def _with_metadata(namespace: str, key: str, value: object) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders())
    s = struct_pb2.Struct()
    s.update({key: value})
    req.metadata_context.filter_metadata[namespace].CopyFrom(s)
    return req


def test_subset_hint_and_served_endpoint_parsing():
    assert xp.subset_hint(pb.ProcessingRequest()) is None
    assert xp.subset_hint(_with_metadata("other", xp.SUBSET_KEY, ["a:1"])) is None
    assert xp.subset_hint(_with_metadata(xp.SUBSET_NAMESPACE, xp.SUBSET_KEY, [])) == []
    assert xp.subset_hint(_with_metadata(xp.SUBSET_NAMESPACE, xp.SUBSET_KEY, ["a:1", " b:2 ", 7, ""])) == ["a:1", "b:2"]
    assert xp.subset_hint(_with_metadata(xp.SUBSET_NAMESPACE, xp.SUBSET_KEY, "a:1,b:2")) == ["a:1", "b:2"]
    assert xp.subset_hint(_with_metadata(xp.SUBSET_NAMESPACE, xp.SUBSET_KEY, 3)) == []
    assert xp.served_endpoint(_with_metadata(xp.DESTINATION_NAMESPACE, xp.SERVED_KEY, "10.0.0.2:8000")) == "10.0.0.2:8000"
    assert xp.served_endpoint(_with_metadata(xp.DESTINATION_NAMESPACE, "other", "x")) is None


def test_stream_config_defaults_to_gaie_and_knows_who_waits_for_headers():
    assert xp.StreamConfig.of(pb.ProcessingRequest()) == xp.StreamConfig()
    assert not xp.StreamConfig().request_waits_for_headers and xp.StreamConfig().response_body_streamed
    req = pb.ProcessingRequest(protocol_config=pb.ProtocolConfiguration(request_body_mode=xp.STREAMED, response_body_mode=xp.NONE))
    cfg = xp.StreamConfig.of(req)
    assert cfg.request_waits_for_headers and not cfg.response_body_streamed
    assert not xp.StreamConfig(xp.STREAMED, xp.STREAMED, True).request_waits_for_headers
    assert xp.StreamConfig(xp.BUFFERED).request_waits_for_headers


def test_streamed_chunks_respect_the_limit_and_mark_the_end():
    body = bytes(range(256)) * 500  # 128,000 bytes
    chunks = xp.streamed_chunks(body, True)
    assert [len(c.body_mutation.streamed_response.body) for c in chunks] == [62_000, 62_000, 4_000]
    assert [c.body_mutation.streamed_response.end_of_stream for c in chunks] == [False, False, True]
    assert b"".join(c.body_mutation.streamed_response.body for c in chunks) == body
    assert not any(c.body_mutation.streamed_response.end_of_stream for c in xp.streamed_chunks(body, False))
    assert len(xp.streamed_chunks(b"", True)) == 1


@given(st.binary(max_size=300), st.integers(1, 50))
def test_split_keeps_the_bytes(body, n):
    parts = split(body, n)
    assert b"".join(parts) == body and len(parts) <= max(n, 1) and (all(parts) or body == b"")


def test_immediate_response_status_per_code():
    for code, status in (("invalid_request", 400), ("no_workers", 503), ("constraints_unsatisfied", 503),
                         ("overloaded", 429), ("timeout", 503), ("internal", 500)):
        resp = xp.immediate_response(code, "m")
        assert resp.immediate_response.status.code == status
        assert b'"code":"%s"' % code.encode() in resp.immediate_response.body


def test_label_filter_semantics_and_syntax():
    f = LabelFilter("tier", frozenset({"gold", ""}), allow_missing=False)
    assert f.passes({"tier": "gold"}) and f.passes({"tier": ""}) and not f.passes({"tier": "x"})
    assert not f.passes({})  # a missing label never matches an empty value
    assert LabelFilter("tier", frozenset({"gold"}), allow_missing=True).passes({})
    got = parse_label_filters(["a:tier=gold|silver", "zone?=x"], ["a", "b"])
    assert got == {
        "a": [LabelFilter("tier", frozenset({"gold", "silver"})), LabelFilter("zone", frozenset({"x"}), True)],
        "b": [LabelFilter("zone", frozenset({"x"}), True)],
    }
    for bad in ("tier", "=x", "a:b:c=d"):
        with pytest.raises(ValueError):
            parse_label_filters([bad], ["a"])


def test_pod_index_maps_endpoints_to_ranks_and_applies_the_label_filter():
    recs = [
        record(1, labels={"tier": "gold"}),
        record(2, labels={"tier": "bronze"}),
        record(3, address="10.0.0.3", dp_size=2, dp_ports=[9001, 9002], labels={"tier": "gold"}),
        record(4, address="10.0.0.4", dp_size=2, labels={"tier": "gold"}),  # ranks share one port
    ]
    plain = PodIndex(recs)
    assert plain.allowed(None) is None
    assert plain.targets(["10.0.0.3:9002", "10.0.0.2:8000", "nope:1"]) == [(2, 0), (3, 1)]
    assert plain.targets(["10.0.0.4:8000"]) == [(4, 0), (4, 1)]
    filtered = PodIndex(recs, [LabelFilter("tier", frozenset({"gold"}))])
    assert filtered.allowed(None) == [1, 3, 4]
    assert filtered.targets(["10.0.0.2:8000"]) == []
    none_pass = PodIndex(recs, [LabelFilter("tier", frozenset({"platinum"}))])
    assert none_pass.allowed(None) == []


def test_overloaded_carries_retry_after_and_query_instance_id_is_answered_by_the_gateway():
    """GAIE: a saturated pool answers 429 (here with the admission queue's hint as HTTP
    Retry-After); Dynamo's `query_instance_id` gets the worker ids, not a routed request."""
    import json

    from schemas.api import ErrorCode, SelectReply, Target

    resp = xp.immediate_response(ErrorCode.OVERLOADED, "busy", None, 1.2).immediate_response
    headers = {h.header.key: h.header.raw_value.decode() or h.header.value for h in resp.headers.set_headers}
    assert resp.status.code == 429 and headers["retry-after"] == "2"
    assert json.loads(resp.body)["error"]["retry_after_s"] == 1.2
    assert "retry-after" not in {h.header.key for h in xp.immediate_response(ErrorCode.NO_WORKERS, "x").immediate_response.headers.set_headers}
    reply = SelectReply(decode=Target(7, 1), prefill=Target(3, 0), overlap_blocks=0, isl_tokens=1, block_size=16, cost=0.0,
                        mode="disaggregated")
    ans = xp.instance_id_response(reply).immediate_response
    assert ans.status.code == 200
    assert json.loads(ans.body)["nvext"]["worker_id"] == {"decode_worker_id": 7, "decode_dp_rank": 1, "prefill_worker_id": 3,
                                                          "prefill_dp_rank": 0}
