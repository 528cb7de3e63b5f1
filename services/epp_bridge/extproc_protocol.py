"""Envoy ext_proc messages of the endpoint picker protocol: pure builders and parsers, no I/O.

Everything here works on the generated protos of `xds-protos` (envoy.service.ext_proc.v3); the
server (`extproc.py`) and the client (`extproc_client.py`) share it. Protocol references: GAIE's
"Endpoint Picker Protocol" (kubernetes-sigs/gateway-api-inference-extension, proposal 004) and its reference EPP
(pkg/epp/handlers/server.go, request.go, response.go), Envoy's
api/envoy/service/ext_proc/v3/external_processor.proto and
api/envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from schemas import codec
from schemas.api import ERROR_HTTP_STATUS, ErrorCode, SelectReply

Mode = processing_mode_pb2.ProcessingMode
NONE = Mode.NONE
STREAMED = Mode.STREAMED
BUFFERED = Mode.BUFFERED
BUFFERED_PARTIAL = Mode.BUFFERED_PARTIAL
FULL_DUPLEX_STREAMED = Mode.FULL_DUPLEX_STREAMED
MODE_NAMES = {"none": NONE, "streamed": STREAMED, "buffered": BUFFERED, "full_duplex_streamed": FULL_DUPLEX_STREAMED}

# Metadata names of the protocol (GAIE defaults).
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
# Some Envoy deployments cap one streamed chunk at 64 KiB; GAIE's EPP stays under it the same way.
BODY_CHUNK_LIMIT = 62_000

# What an error code becomes for the gateway: the NATS envelope's HTTP status, except a scheduler
# that did not answer, which is the gateway's "no endpoint right now" (503), as the protocol asks.
EXTPROC_STATUS: dict[ErrorCode, int] = {**ERROR_HTTP_STATUS, ErrorCode.TIMEOUT: 503}


@dataclass(frozen=True)
class StreamConfig:
    """How Envoy sends this stream's bodies (`ProcessingRequest.protocol_config`, sent on the first
    message by Envoy ≥ 1.33; GAIE's gateway config, FULL_DUPLEX_STREAMED both ways, when absent)."""

    request_body_mode: int = FULL_DUPLEX_STREAMED
    response_body_mode: int = FULL_DUPLEX_STREAMED
    send_body_without_waiting_for_header_response: bool = False

    @classmethod
    def of(cls, req: pb.ProcessingRequest) -> StreamConfig:
        if not req.HasField("protocol_config"):
            return cls()
        pc = req.protocol_config
        return cls(pc.request_body_mode, pc.response_body_mode, pc.send_body_without_waiting_for_header_response)

    @property
    def request_waits_for_headers(self) -> bool:
        """Whether Envoy holds the body until the request-headers response (so the headers must be
        answered before the body can be seen)."""
        if self.request_body_mode == FULL_DUPLEX_STREAMED:
            return False
        if self.request_body_mode == STREAMED:
            return not self.send_body_without_waiting_for_header_response
        return True  # BUFFERED, BUFFERED_PARTIAL

    @property
    def response_body_streamed(self) -> bool:
        return self.response_body_mode in (STREAMED, FULL_DUPLEX_STREAMED)


def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-cased name → value (`raw_value` wins, as Envoy fills it)."""
    out: dict[str, str] = {}
    for h in headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _struct_field(md: base_pb2.Metadata, namespace: str, key: str) -> struct_pb2.Value | None:
    if namespace not in md.filter_metadata:
        return None
    return md.filter_metadata[namespace].fields.get(key)


def _endpoints_of(value: struct_pb2.Value) -> list[str]:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        items: Iterable[str] = value.string_value.split(",")
    elif kind == "list_value":
        items = (v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value")
    else:
        return []
    return [item.strip() for item in items if item.strip()]


def subset_hint(req: pb.ProcessingRequest) -> list[str] | None:
    """The gateway's candidate endpoints, or None when the request carries no subset hint."""
    if not req.HasField("metadata_context"):
        return None
    value = _struct_field(req.metadata_context, SUBSET_NAMESPACE, SUBSET_KEY)
    return None if value is None else _endpoints_of(value)


def served_endpoint(req: pb.ProcessingRequest) -> str | None:
    """The endpoint that really served the request (response phase), if the gateway says."""
    if not req.HasField("metadata_context"):
        return None
    value = _struct_field(req.metadata_context, DESTINATION_NAMESPACE, SERVED_KEY)
    if value is None:
        return None
    endpoints = _endpoints_of(value)
    return endpoints[0] if endpoints else None


def _header_options(headers: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode())) for k, v in headers.items()]


def destination_metadata(destination: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[DESTINATION_NAMESPACE].struct_value.fields[DESTINATION_KEY].string_value = destination
    return md


def routing_common(headers: Mapping[str, str]) -> pb.CommonResponse:
    # clear_route_cache: the route may depend on the headers just set (GAIE sets it too).
    return pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=_header_options(headers)), clear_route_cache=True)


def request_headers_response(common: pb.CommonResponse | None = None, destination: str | None = None,
                             mode_override: int | None = None) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common or pb.CommonResponse()))
    if destination is not None:
        resp.dynamic_metadata.CopyFrom(destination_metadata(destination))
    if mode_override is not None:
        resp.mode_override.request_body_mode = mode_override
    return resp


def request_body_response(common: pb.CommonResponse | None = None, destination: str | None = None) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common or pb.CommonResponse()))
    if destination is not None:
        resp.dynamic_metadata.CopyFrom(destination_metadata(destination))
    return resp


def streamed_chunks(body: bytes, end_of_stream: bool, limit: int = BODY_CHUNK_LIMIT) -> list[pb.CommonResponse]:
    """The body as FULL_DUPLEX_STREAMED body mutations (≤ `limit` bytes each; the last one carries
    `end_of_stream`)."""
    if not body:
        return [pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(end_of_stream=end_of_stream)))]
    out = []
    for start in range(0, len(body), limit):
        last = start + limit >= len(body)
        chunk = pb.StreamedBodyResponse(body=body[start : start + limit], end_of_stream=end_of_stream and last)
        out.append(pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=chunk)))
    return out


def streamed_request_body(body: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=c)) for c in streamed_chunks(body, end_of_stream)]


def echo_response_body(body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    mutation = pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream))
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))


def immediate_response(code: ErrorCode, message: str, path: str | None = None, retry_after_s: float | None = None) -> pb.ProcessingResponse:
    """An error answered by the gateway itself: HTTP status of the code, the NATS error envelope as
    the JSON body; a `retry-after` header (whole seconds, at least 1) when the router gave a hint."""
    status = EXTPROC_STATUS.get(code, 500)
    body = codec.encode_json(codec.error_reply(code, message, path, retry_after_s))
    set_headers = {"content-type": "application/json"}
    if retry_after_s is not None:
        set_headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))
    headers = pb.HeaderMutation(set_headers=_header_options(set_headers))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status), headers=headers, body=body, details=f"kvr_epp_{code}"
        )
    )


def instance_id_response(reply: SelectReply) -> pb.ProcessingResponse:
    """The answer to a `query_instance_id` request (Dynamo's annotation): 200 with the chosen worker
    ids in Dynamo's response shape (`nvext.worker_id`), answered by the gateway itself: nothing is
    booked and no engine runs the request."""
    worker_id: dict[str, int] = {"decode_worker_id": reply.decode.worker_id, "decode_dp_rank": reply.decode.dp_rank}
    if reply.prefill is not None:
        worker_id.update(prefill_worker_id=reply.prefill.worker_id, prefill_dp_rank=reply.prefill.dp_rank)
    body = codec.encode_json({"nvext": {"worker_id": worker_id}, "mode": reply.mode})
    headers = pb.HeaderMutation(set_headers=_header_options({"content-type": "application/json"}))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=200), headers=headers, body=body, details="kvr_epp_query_instance_id"
        )
    )


@dataclass
class BookingLifecycle:
    """When a booked request's load is released, from the response-phase events of its stream.

    Dynamo marks prefill done at the first output token: the first response body chunk (or the
    response headers when the body is not streamed to us) → `prefill_complete`; the end of the
    response (body end of stream, trailers, headers ending the stream) or the stream ending early
    (client gone, gRPC cancel, upstream error) → `free`. Each returns the booking updates to send,
    so that whatever the order of events, `free` goes out exactly once and nothing after it.
    """

    booked: bool
    prefill_done: bool = False
    freed: bool = False
    moved: set[tuple[int, int]] = field(default_factory=set)

    def response_started(self) -> list[str]:
        if not self.booked or self.freed or self.prefill_done:
            return []
        self.prefill_done = True
        return ["prefill_complete"]

    def served_by(self, target: tuple[int, int], booked_target: tuple[int, int]) -> list[str]:
        if not self.booked or self.freed or target == booked_target or target in self.moved:
            return []
        self.moved.add(target)
        return ["move"]

    def finished(self) -> list[str]:
        if not self.booked or self.freed:
            return []
        self.freed = True
        return ["free"]

