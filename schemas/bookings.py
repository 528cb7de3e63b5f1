"""Booking events on stream KVR_BOOKINGS: the replicated in-flight load (docs/protocol.md §4)."""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from msgspec import Meta

from .types import MAX_TOKENS, U64_MASK, DpRank, Hash, NonNegInt, Pool, RequestId, WorkerId, to_u64

# One select's attempt to book a request (unique per attempt; retries of the same attempt reuse it).
BookingId = Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")]


def new_booking_id() -> str:
    return uuid.uuid4().hex[:20]


class _BookingBase(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    request_id: RequestId
    router_id: Annotated[str, Meta(min_length=1, max_length=128)]
    pool: Pool
    ts_ms: NonNegInt = 0
    # The booking (select attempt) an event belongs to; "" (events of older versions) = every
    # booking of the request id.
    booking_id: BookingId = ""


class BookingAdd(_BookingBase, tag="add", kw_only=True):
    worker_id: WorkerId
    dp_rank: DpRank = 0
    isl_tokens: NonNegInt = 0
    overlap_blocks: NonNegInt = 0
    sequence_hashes: Annotated[list[Hash], Meta(max_length=MAX_TOKENS)] = []
    expected_output_tokens: NonNegInt | None = None
    # Which leg of a disaggregated request this booking is ("" = aggregated / decode).
    leg: str = ""
    # Block size the sequence hashes were computed with (needed to turn tokens into blocks).
    block_size: Annotated[int, Meta(ge=1, le=65536)] = 16
    # When false the request contributes no prefill tokens (decode leg of disaggregated mode).
    track_prefill_tokens: bool = True

    def __post_init__(self) -> None:
        hashes = self.sequence_hashes
        for i, h in enumerate(hashes):
            if not 0 <= h <= U64_MASK:
                hashes[i] = to_u64(h)


class BookingPrefillComplete(_BookingBase, tag="prefill_complete", kw_only=True):
    pass


class BookingFree(_BookingBase, tag="free", kw_only=True):
    pass


class BookingMove(_BookingBase, tag="move", kw_only=True):
    """The request was served by another target than the one booked (a gateway fallback): its
    decode leg moves there with all its load."""

    worker_id: WorkerId
    dp_rank: DpRank = 0


BookingEvent = BookingAdd | BookingPrefillComplete | BookingFree | BookingMove


def booking_msg_id(pool: str, request_id: str, type_: str, leg: str = "", booking_id: str = "") -> str:
    """`Nats-Msg-Id: {pool}:{request_id}:{type}:{booking_id}`, `:prefill` appended for a disaggregated
    prefill leg. Unique per booking, so a request id booked again after its free is a new message,
    while a retried publish of the same event is still dropped by JetStream."""
    base = f"{pool}:{request_id}:{type_}"
    if booking_id:
        base = f"{base}:{booking_id}"
    return f"{base}:{leg}" if leg else base
