"""A small ext_proc client that drives one HTTP request the way Envoy's ext_proc filter does.

Used by the tests, `bench/ext_proc.py` and `kvr epp extproc|health`, so an operator can check a
deployed endpoint picker (any implementation of the protocol, not only kvr's) without a gateway.

Per body mode, like Envoy:
* FULL_DUPLEX_STREAMED (GAIE's configuration): headers and every body chunk are sent without
  waiting; the processor answers the headers (routing) and sends the body back as streamed
  mutations, the last one with end_of_stream. The response body likewise, chunk by chunk.
* STREAMED: the headers wait for their answer (unless send_body_without_waiting_for_header_response);
  a `mode_override` to BUFFERED in that answer is honoured (the filter's allow_mode_override); each
  body chunk gets one answer, in order.
* BUFFERED: headers, their answer, then the whole body in one message and its answer.
* NONE (response only): the response body is not sent to the processor.
The first message carries `protocol_config`, as Envoy ≥ 1.33 sends it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import extproc_protocol as xp


class ProtocolViolation(AssertionError):
    """The processor answered out of order or with the wrong message for the phase."""


@dataclass
class Decision:
    """What the gateway learnt from the request phase."""

    status: int | None = None  # HTTP status of an ImmediateResponse; None = routed
    error: dict[str, Any] | None = None  # its JSON body
    headers: dict[str, str] = field(default_factory=dict)  # headers set on the forwarded request
    metadata: dict[str, Any] = field(default_factory=dict)  # dynamic_metadata, as plain dicts
    body: bytes = b""  # the request body as the processor passed it on
    responses: list[str] = field(default_factory=list)  # kinds of ProcessingResponse, in order
    mode_override: int | None = None

    @property
    def routed(self) -> bool:
        return self.status is None

    @property
    def destination(self) -> str | None:
        return self.headers.get(xp.DESTINATION_KEY)

    @property
    def endpoints(self) -> list[str]:
        return [e for e in (self.destination or "").split(",") if e]

    @property
    def metadata_destination(self) -> str | None:
        return self.metadata.get(xp.DESTINATION_NAMESPACE, {}).get(xp.DESTINATION_KEY)


def _headers(values: Mapping[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])


def _metadata(namespace: str, key: str, value: Any) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    s = struct_pb2.Struct()
    s.update({key: value})
    md.filter_metadata[namespace].CopyFrom(s)
    return md


def split(body: bytes, chunks: int) -> list[bytes]:
    """`body` in `chunks` pieces of (nearly) equal size; never an empty piece unless the body is."""
    n = max(1, min(chunks, len(body) or 1))
    step = -(-len(body) // n) if body else 0
    return [body[i : i + step] for i in range(0, len(body), step)] if body else [b""]


class ExtProcStream:
    """One HTTP request through the filter, phase by phase. Every read has a deadline: a processor
    that does not answer raises TimeoutError instead of hanging the caller."""

    def __init__(
        self,
        stub: pb_grpc.ExternalProcessorStub,
        *,
        request_mode: int = xp.FULL_DUPLEX_STREAMED,
        response_mode: int = xp.FULL_DUPLEX_STREAMED,
        send_body_without_waiting: bool = False,
        allow_mode_override: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.call = stub.Process()
        self.request_mode = request_mode
        self.response_mode = response_mode
        self.send_body_without_waiting = send_body_without_waiting
        self.allow_mode_override = allow_mode_override
        self.timeout = timeout
        self._first = True
        self.ended = False  # the processor ended the stream (ImmediateResponse)

    async def _write(self, msg: pb.ProcessingRequest) -> None:
        if self._first:
            msg.protocol_config.CopyFrom(
                pb.ProtocolConfiguration(
                    request_body_mode=self.request_mode,
                    response_body_mode=self.response_mode,
                    send_body_without_waiting_for_header_response=self.send_body_without_waiting,
                )
            )
            self._first = False
        # asyncio.timeout, not wait_for: no extra task per message (the benchmark sends thousands/s)
        async with asyncio.timeout(self.timeout):
            await self.call.write(msg)

    async def _read(self) -> pb.ProcessingResponse:
        async with asyncio.timeout(self.timeout):
            resp = await self.call.read()
        if resp is grpc.aio.EOF:
            raise ProtocolViolation("the processor closed the stream without an answer")
        return resp

    def _immediate(self, resp: pb.ProcessingResponse, decision: Decision) -> bool:
        if resp.WhichOneof("response") != "immediate_response":
            return False
        ir = resp.immediate_response
        decision.status = int(ir.status.code)
        try:
            decision.error = json.loads(ir.body) if ir.body else None
        except ValueError:
            decision.error = {"raw": bytes(ir.body).decode("utf-8", "replace")}
        for h in ir.headers.set_headers:
            decision.headers[h.header.key] = h.header.raw_value.decode() if h.header.raw_value else h.header.value
        self.ended = True
        return True

    @staticmethod
    def _apply(common: pb.CommonResponse, resp: pb.ProcessingResponse, decision: Decision) -> None:
        for h in common.header_mutation.set_headers:
            decision.headers[h.header.key] = h.header.raw_value.decode() if h.header.raw_value else h.header.value
        if resp.HasField("dynamic_metadata"):
            decision.metadata.update(MessageToDict(resp.dynamic_metadata))

    async def _expect(self, kind: str, decision: Decision) -> pb.ProcessingResponse | None:
        resp = await self._read()
        got = resp.WhichOneof("response") or "empty"
        decision.responses.append(got)
        if self._immediate(resp, decision):
            return None
        if got != kind:
            raise ProtocolViolation(f"expected {kind}, got {got}")
        part = getattr(resp, kind)
        if kind.endswith("trailers"):
            for h in part.header_mutation.set_headers:
                decision.headers[h.header.key] = h.header.raw_value.decode() if h.header.raw_value else h.header.value
        else:
            self._apply(part.response, resp, decision)
        if kind == "request_headers" and resp.HasField("mode_override"):
            decision.mode_override = int(resp.mode_override.request_body_mode)
        return resp

    # --- request phase ----------------------------------------------------------------------

    async def request(
        self,
        body: bytes | None,
        *,
        headers: Mapping[str, str] | None = None,
        chunks: int = 1,
        subset: Sequence[str] | None = None,
        subset_value: Any = None,
        trailers: bool = False,
    ) -> Decision:
        decision = Decision()
        hdrs = {":method": "POST" if body is not None else "GET", ":path": "/v1/chat/completions", ":authority": "gateway",
                "content-type": "application/json", **(headers or {})}
        if body is not None:
            hdrs.setdefault("content-length", str(len(body)))
        msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers(hdrs), end_of_stream=body is None))
        if subset is not None or subset_value is not None:
            msg.metadata_context.CopyFrom(_metadata(xp.SUBSET_NAMESPACE, xp.SUBSET_KEY, list(subset) if subset is not None else subset_value))
        await self._write(msg)
        if body is None:
            await self._expect("request_headers", decision)
            return decision

        mode = self.request_mode
        waits = mode in (xp.BUFFERED, xp.BUFFERED_PARTIAL) or (mode == xp.STREAMED and not self.send_body_without_waiting)
        if waits:
            if await self._expect("request_headers", decision) is None:
                return decision
            if decision.mode_override is not None and self.allow_mode_override:
                mode = decision.mode_override
        pieces = [body] if mode in (xp.BUFFERED, xp.BUFFERED_PARTIAL) else split(body, chunks)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            await self._write(pb.ProcessingRequest(request_body=pb.HttpBody(body=piece, end_of_stream=last and not trailers)))
        if trailers:
            await self._write(pb.ProcessingRequest(request_trailers=pb.HttpTrailers(trailers=_headers({"x-trailer": "1"}))))

        if mode == xp.FULL_DUPLEX_STREAMED:
            if await self._expect("request_headers", decision) is None:
                return decision
            out = bytearray()
            while True:
                resp = await self._expect("request_body", decision)
                if resp is None:
                    return decision
                streamed = resp.request_body.response.body_mutation.streamed_response
                out += streamed.body
                if streamed.end_of_stream or (trailers and len(out) >= len(body)):
                    break
            decision.body = bytes(out)
        else:
            if not waits and await self._expect("request_headers", decision) is None:
                return decision
            for _ in pieces:
                resp = await self._expect("request_body", decision)
                if resp is None:
                    return decision
                mutation = resp.request_body.response.body_mutation
                if mutation.WhichOneof("mutation") is not None:
                    raise ProtocolViolation(f"the body was mutated in {mode} mode: {mutation}")
            decision.body = body
        if trailers:
            await self._expect("request_trailers", decision)
        return decision

    # --- response phase ---------------------------------------------------------------------

    async def response_headers(
        self,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        served: str | None = None,
        end_of_stream: bool = False,
    ) -> dict[str, str]:
        """The upstream response's headers through the processor (with the endpoint that served it
        when the gateway reports one); returns the header mutations the processor asked for."""
        trace = Decision()
        hdrs = {":status": str(status), "content-type": "text/event-stream", **(headers or {})}
        msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_headers(hdrs), end_of_stream=end_of_stream))
        if served is not None:
            msg.metadata_context.CopyFrom(_metadata(xp.DESTINATION_NAMESPACE, xp.SERVED_KEY, served))
        await self._write(msg)
        await self._expect("response_headers", trace)
        return trace.headers

    async def response_chunk(self, piece: bytes, end_of_stream: bool) -> bytes:
        """One upstream body chunk through the processor; returns the bytes to pass on downstream.
        FULL_DUPLEX_STREAMED: the processor's streamed mutation; STREAMED and BUFFERED: the chunk
        once answered (a BUFFERED caller passes the whole body at once); NONE: not sent at all."""
        if self.response_mode == xp.NONE:
            return piece
        await self._write(pb.ProcessingRequest(response_body=pb.HttpBody(body=piece, end_of_stream=end_of_stream)))
        resp = await self._expect("response_body", Decision())
        if resp is None:
            raise ProtocolViolation("the processor answered a response body with an ImmediateResponse")
        if self.response_mode == xp.FULL_DUPLEX_STREAMED:
            return bytes(resp.response_body.response.body_mutation.streamed_response.body)
        return piece

    async def response(
        self,
        body_chunks: Sequence[bytes] = (b'data: {"choices": [{"text": "hi"}]}\n\n', b"data: [DONE]\n\n"),
        *,
        status: int = 200,
        served: str | None = None,
        trailers: bool = False,
        end: bool = True,
    ) -> bytes:
        """Send the upstream response through the processor; returns the body as passed on.
        `end=False` leaves the response unfinished (more would follow; `finish` or `cancel` next)."""
        await self.response_headers(status, served=served, end_of_stream=not body_chunks and not trailers)
        out = bytearray()
        if body_chunks and self.response_mode != xp.NONE:
            buffered = self.response_mode in (xp.BUFFERED, xp.BUFFERED_PARTIAL)
            pieces = [b"".join(body_chunks)] if buffered else list(body_chunks)
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                out += await self.response_chunk(piece, end_of_stream=last and end and not trailers)
        if trailers and end:
            await self._write(pb.ProcessingRequest(response_trailers=pb.HttpTrailers(trailers=_headers({"grpc-status": "0"}))))
            await self._expect("response_trailers", Decision())
        return bytes(out)

    async def finish(self) -> None:
        """The HTTP stream is over: half-close and wait for the processor to end the RPC."""
        async with asyncio.timeout(self.timeout):
            await self.call.done_writing()
        while True:
            async with asyncio.timeout(self.timeout):
                resp = await self.call.read()
            if resp is grpc.aio.EOF:
                return
            raise ProtocolViolation(f"unexpected {resp.WhichOneof('response')} after the end of the stream")

    async def send_raw(self, msg: pb.ProcessingRequest) -> None:
        await self._write(msg)

    async def read_raw(self) -> pb.ProcessingResponse:
        return await self._read()

    def cancel(self) -> None:
        """The downstream client went away: Envoy resets the gRPC stream."""
        self.call.cancel()


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


class ExtProcClient:
    """A channel to an endpoint picker. `tls=True` (or a CA) → TLS; `cert`/`key` → mTLS."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or ca or cert:
            self.channel = grpc.aio.secure_channel(target, channel_credentials(ca, cert, key), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> ExtProcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def stream(self, **kw: Any) -> ExtProcStream:
        return ExtProcStream(self.stub, **kw)

    async def lifecycle(
        self,
        body: bytes | None,
        *,
        chunks: int = 1,
        subset: Sequence[str] | None = None,
        headers: Mapping[str, str] | None = None,
        response_chunks: Sequence[bytes] = (b'data: {"choices": [{"text": "hi"}]}\n\n', b"data: [DONE]\n\n"),
        served: str | None = None,
        **kw: Any,
    ) -> Decision:
        """One whole request: request phase, then (when routed) the response and the end of stream."""
        s = self.stream(**kw)
        try:
            decision = await s.request(body, chunks=chunks, subset=subset, headers=headers)
            if decision.routed:
                await s.response(response_chunks, served=served)
            await s.finish()
            return decision
        except BaseException:
            s.cancel()
            raise

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN (NOT_FOUND → SERVICE_UNKNOWN)."""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
