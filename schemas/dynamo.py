"""NVIDIA Dynamo's event plane over ZMQ, as its KV-event publishers send it (docs/relay.md, "Dynamo's
event plane"): what `kvr relay --source dynamo` reads.

One message = four ZMQ frames `[topic, publisher_id (u64 BE), sequence (u64 BE), body]`; the body is
a frame header (1 version byte = 1, then the payload length as u32 BE) and the payload, a msgpack
map `EventEnvelope {topic, publisher_id, sequence, published_at, payload}` whose `payload` (msgpack
bin) is itself msgpack: Dynamo's RouterEvents (maps, as its `rmp_serde::to_vec_named` writes them),
one or a list. `sequence` counts the messages of one publisher; `publisher_id` is new for every
publisher process, so a different id on the same worker means the publisher restarted.

Pure: decoding raises `BadFrame` with a short reason (a metric label) and never anything else.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta

from .events import KvCacheEvent, ResidencyDomain, RouterEvent, StorageTier
from .types import MAX_EVENTS_PER_MESSAGE

FRAME_VERSION = 1
_FRAME_HEADER = struct.Struct(">BI")  # version, payload length
FRAME_HEADER_SIZE = _FRAME_HEADER.size
U64 = Annotated[int, Meta(ge=0)]  # msgpack integers stop at 2**64 - 1


class EventEnvelope(msgspec.Struct):
    """Dynamo's `EventEnvelope` (its other fields, e.g. `published_at_ns`, are ignored)."""

    publisher_id: U64
    sequence: U64
    payload: bytes
    published_at: U64 = 0
    topic: Annotated[str, Meta(max_length=1024)] = ""


class DynamoRouterEvent(msgspec.Struct):
    """A RouterEvent as Dynamo's publisher writes it: its worker id is Dynamo's instance id (any
    u64), which the relay replaces with its own worker's (`state_source`, `session_id` ignored)."""

    worker_id: U64
    event: KvCacheEvent
    storage_tier: StorageTier = "device"
    residency_domain: ResidencyDomain = UNSET

    def as_worker(self, worker_id: int) -> RouterEvent:
        return RouterEvent(worker_id, self.event, self.storage_tier, self.residency_domain)


DynamoPayload = DynamoRouterEvent | Annotated[list[DynamoRouterEvent], Meta(max_length=MAX_EVENTS_PER_MESSAGE)]


class PlaneMessage(msgspec.Struct):
    topic: bytes
    publisher_id: int
    sequence: int
    published_at: int
    events: list[DynamoRouterEvent]


class BadFrame(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_envelope = msgspec.msgpack.Decoder(EventEnvelope)
_payload = msgspec.msgpack.Decoder(DynamoPayload)


def decode_message(frames: list[bytes] | list[Any]) -> PlaneMessage:
    """One event-plane message from its ZMQ frames; `BadFrame` when anything does not fit."""
    if len(frames) != 4:
        raise BadFrame("frames", f"{len(frames)} frames, expected 4")
    topic, pid_b, seq_b, body = (bytes(f) for f in frames)
    if len(pid_b) != 8 or len(seq_b) != 8:
        raise BadFrame("header", "publisher_id and sequence must be 8 bytes each")
    publisher_id = int.from_bytes(pid_b, "big")
    sequence = int.from_bytes(seq_b, "big")
    if len(body) < FRAME_HEADER_SIZE:
        raise BadFrame("frame_header", f"{len(body)} bytes")
    version, length = _FRAME_HEADER.unpack_from(body)
    if version != FRAME_VERSION:
        raise BadFrame("frame_version", str(version))
    if len(body) - FRAME_HEADER_SIZE < length:
        raise BadFrame("frame_length", f"header says {length} bytes, {len(body) - FRAME_HEADER_SIZE} follow")
    try:
        env = _envelope.decode(body[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadFrame("envelope", str(exc)[:200]) from None
    if env.publisher_id != publisher_id or env.sequence != sequence:
        raise BadFrame("envelope_mismatch", "the envelope's publisher_id/sequence differ from the frames'")
    try:
        payload = _payload.decode(env.payload)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise BadFrame("payload", str(exc)[:200]) from None
    events = payload if isinstance(payload, list) else [payload]
    return PlaneMessage(topic, publisher_id, sequence, env.published_at, events)
