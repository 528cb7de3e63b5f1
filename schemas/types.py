"""Shared scalar types and limits of the wire contract (docs/protocol.md §0)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

U64_MASK = (1 << 64) - 1
I64_MAX = (1 << 63) - 1

# Every number on the wire has bounds (a test walks every message type and checks): whatever a
# service accepts must survive its own snapshot (msgpack: at most 64 bits) and a replay, and a peer
# in a language with fixed-width integers must be able to read it back.

# Hashes are u64 on the wire; publishers that wrote signed i64 are accepted and
# reinterpreted bitwise (see `to_u64`). msgspec cannot express an upper bound beyond i64, so the
# types holding hashes check it in `__post_init__` (HASH_DESCRIPTION marks them for the bounds test).
HASH_DESCRIPTION = "unsigned 64-bit hash (negative i64 accepted)"
Hash = Annotated[int, Meta(ge=-(1 << 63), description=HASH_DESCRIPTION)]
MAX_WORKER_ID = (1 << 53) - 1
WorkerId = Annotated[int, Meta(ge=0, lt=1 << 53, description="worker id, < 2**53")]
DpRank = Annotated[int, Meta(ge=0, le=65535)]
TokenId = Annotated[int, Meta(ge=0, le=0xFFFFFFFF)]
NonNegInt = Annotated[int, Meta(ge=0, le=I64_MAX, description="non-negative, < 2**63")]
BlockSize = Annotated[int, Meta(ge=1, le=65536)]
Pool = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
RequestId = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\s*>]+$")]
FiniteFloat = Annotated[float, Meta(ge=-1e12, le=1e12)]  # rejects NaN and infinities

# Hard caps that keep a hostile payload from allocating without bound. Services apply
# their own (configurable, smaller) limits on top.
MAX_BLOCKS_PER_EVENT = 16_384
MAX_EVENTS_PER_MESSAGE = 4_096
MAX_TOKENS = 2_097_152
MAX_BLOCK_HASHES = MAX_TOKENS // 1  # one hash per token at block size 1
MAX_WORKER_IDS = 65_536
MAX_TAINTS = 256


def to_u64(value: int) -> int:
    """Reinterpret a signed 64-bit value as unsigned (two's complement); reject wider values."""
    if value < 0:
        return value & U64_MASK
    if value > U64_MASK:
        raise ValueError("hash does not fit in 64 bits")
    return value
