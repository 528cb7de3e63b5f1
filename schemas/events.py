"""KV-cache events carried on stream KVR_KV (docs/protocol.md §2), Dynamo-compatible."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .types import I64_MAX, MAX_BLOCKS_PER_EVENT, U64_MASK, DpRank, Hash, NonNegInt, WorkerId, to_u64

# Fastest first; the one declaration of the tiers (the index derives its order from it).
StorageTier = Literal["device", "host_pinned", "disk", "external"]


class StoredBlock(msgspec.Struct, omit_defaults=True):
    block_hash: Hash
    tokens_hash: Hash
    mm_extra_info: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.block_hash <= U64_MASK:
            self.block_hash = to_u64(self.block_hash)
        if not 0 <= self.tokens_hash <= U64_MASK:
            self.tokens_hash = to_u64(self.tokens_hash)


class StoreData(msgspec.Struct, omit_defaults=True):
    blocks: Annotated[list[StoredBlock], Meta(min_length=1, max_length=MAX_BLOCKS_PER_EVENT)]
    parent_hash: Hash | None = None
    start_position: NonNegInt | None = None

    def __post_init__(self) -> None:
        if self.parent_hash is not None and not 0 <= self.parent_hash <= U64_MASK:
            self.parent_hash = to_u64(self.parent_hash)


class RemoveData(msgspec.Struct):
    block_hashes: Annotated[list[Hash], Meta(min_length=1, max_length=MAX_BLOCKS_PER_EVENT)]

    def __post_init__(self) -> None:
        hashes = self.block_hashes
        for i, h in enumerate(hashes):
            if not 0 <= h <= U64_MASK:
                hashes[i] = to_u64(h)


class EventData(msgspec.Struct, omit_defaults=True):
    """Externally tagged payload: exactly one of `stored` / `removed` (or the string "cleared")."""

    stored: StoreData | None = None
    removed: RemoveData | None = None

    def __post_init__(self) -> None:
        if (self.stored is None) == (self.removed is None):
            raise ValueError('exactly one of "stored" or "removed" must be present')


CLEARED: Literal["cleared"] = "cleared"
EventPayload = EventData | Literal["cleared"]


class KvCacheEvent(msgspec.Struct, omit_defaults=True):
    event_id: NonNegInt  # Dynamo's is a u64 counter; < 2**63 here (msgspec bounds stop at i64)
    data: EventPayload
    dp_rank: DpRank = 0


# Dynamo's `residency_domain`: who owns the cached copy. Absent = the worker (legacy publishers);
# `worker` is applied; anything else (`cache_owner`, an unknown name, an explicit null) is not the
# worker's own cache and is skipped by the index (counted), a `cleared` included.
WORKER_DOMAIN = "worker"
ResidencyDomain = Annotated[str, Meta(max_length=64)] | None | UnsetType


def is_worker_domain(domain: str | None | UnsetType) -> bool:
    """The residency domain of the worker's own cache: absent (legacy publishers) or `worker`."""
    return domain is UNSET or domain == WORKER_DOMAIN


class RouterEvent(msgspec.Struct, omit_defaults=True):
    worker_id: WorkerId
    event: KvCacheEvent
    storage_tier: StorageTier = "device"
    residency_domain: ResidencyDomain = UNSET

    @property
    def worker_domain(self) -> bool:
        """The event is about the worker's own cache (docs/protocol.md §2)."""
        return is_worker_domain(self.residency_domain)

    @property
    def kind(self) -> str:
        data = self.event.data
        if isinstance(data, str):
            return "cleared"
        return "stored" if data.stored is not None else "removed"


def stored_event(
    worker_id: int,
    event_id: int,
    blocks: list[tuple[int, int]],
    parent_hash: int | None = None,
    dp_rank: int = 0,
    storage_tier: StorageTier = "device",
) -> RouterEvent:
    """Build a stored event from (block_hash, tokens_hash) pairs."""
    data = EventData(stored=StoreData(blocks=[StoredBlock(b, t) for b, t in blocks], parent_hash=parent_hash))
    return RouterEvent(worker_id, KvCacheEvent(event_id, data, dp_rank), storage_tier)


def removed_event(
    worker_id: int, event_id: int, block_hashes: list[int], dp_rank: int = 0, storage_tier: StorageTier = "device"
) -> RouterEvent:
    data = EventData(removed=RemoveData(block_hashes=list(block_hashes)))
    return RouterEvent(worker_id, KvCacheEvent(event_id, data, dp_rank), storage_tier)


def cleared_event(worker_id: int, event_id: int, dp_rank: int = 0, storage_tier: StorageTier = "device") -> RouterEvent:
    return RouterEvent(worker_id, KvCacheEvent(event_id, CLEARED, dp_rank), storage_tier)


MSG_ID = "Nats-Msg-Id"


def kv_msg_id(pool: str, worker_id: int, dp_rank: int, first_event_id: int, epoch: int = 0) -> str:
    """The `Nats-Msg-Id` publishers set so JetStream de-duplicates retries (docs/protocol.md §2):
    `{pool}:{worker}:{rank}:{epoch}:{first_event_id}`, the epoch naming the publisher's run (its
    start), so a restarted publisher's ids from 1 are not taken for the old run's retries; epoch 0
    (none) writes the first format `{pool}:{worker}:{rank}:{first_event_id}`."""
    if epoch:
        return f"{pool}:{worker_id}:{dp_rank}:{epoch}:{first_event_id}"
    return f"{pool}:{worker_id}:{dp_rank}:{first_event_id}"


def kv_msg_epoch(msg_id: str | None) -> int:
    """The publisher epoch a KV message's `Nats-Msg-Id` carries; 0 for the first format, no id or
    anything unreadable (the message is still applied, as from a publisher without epochs)."""
    if not msg_id:
        return 0
    parts = msg_id.split(":")
    if len(parts) != 5 or not parts[3].isdigit() or len(parts[3]) > 19:
        return 0
    epoch = int(parts[3])
    return epoch if epoch <= I64_MAX else 0
