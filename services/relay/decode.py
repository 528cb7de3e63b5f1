"""Tolerant decoder of vLLM / SGLang KV-event batches (vLLM's `vllm/distributed/kv_events.py`). Pure, no I/O.

vLLM has shipped several encodings of the same data, so everything is decoded to msgpack builtins
first and then read by position *or* by name:

- envelope `KVEventBatch`: positional `[ts, events, dp_rank]` (normal) or a map
  (`ts`, `events`, `data_parallel_rank` / `dp_rank` / `attn_dp_rank`);
- events: positional `[tag, field1, ...]` (vLLM ≤ 0.25, trailing defaults omitted) or maps with a
  `"type"` key (≥ 0.26, default-valued fields omitted);
- block hashes: msgpack ints (u64, or negative i64 from older publishers) or `bin` digests, of which
  the low 64 bits (last 8 bytes, big-endian) are used, as vLLM does for its int form.

Unknown trailing fields / keys are ignored. An event that cannot be read is reported as
`BadEvent(reason)` and the rest of the batch is kept; an unreadable envelope raises `BadBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

U64_MASK = (1 << 64) - 1
MAX_EVENTS_PER_BATCH = 65_536
MAX_BLOCKS_PER_EVENT = 16_384
MAX_TOKENS_PER_EVENT = 2_097_152

# Field order of the positional (legacy, array_like) encodings, after the tag.
STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
)
REMOVED_FIELDS = ("block_hashes", "medium", "group_idx", "locality")
CLEARED_FIELDS = ("medium",)
RANK_KEYS = ("data_parallel_rank", "dp_rank", "attn_dp_rank")

_decoder = msgspec.msgpack.Decoder()


class BadBatch(ValueError):
    """The payload is not a KV-event batch at all (bad msgpack, wrong envelope)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int | None
    medium: str | None
    lora_name: str | None
    cache_salt: str | None
    extra_keys: list[Any] | None
    group_idx: int | None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None


@dataclass(slots=True)
class AllBlocksCleared:
    medium: str | None


@dataclass(slots=True)
class BadEvent:
    reason: str
    detail: str


EngineEvent = BlockStored | BlockRemoved | AllBlocksCleared | BadEvent


@dataclass(slots=True)
class EngineBatch:
    ts: float | None
    events: list[EngineEvent]
    dp_rank: int | None


class _Invalid(ValueError):
    pass


def block_hash(value: Any) -> int:
    """An engine block hash as u64: ints reinterpreted bitwise, byte digests cut to their low 64 bits."""
    if type(value) is int:
        if 0 <= value <= U64_MASK:
            return value
        if -(1 << 63) <= value < 0:
            return value & U64_MASK
        raise _Invalid(f"hash {value} does not fit in 64 bits")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if not raw:
            raise _Invalid("empty byte hash")
        return int.from_bytes(raw[-8:], "big")
    raise _Invalid(f"hash of type {type(value).__name__}")


def _hash_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list):
        raise _Invalid(f"{field} is {type(value).__name__}, want a list")
    if len(value) > MAX_BLOCKS_PER_EVENT:
        raise _Invalid(f"{field} has {len(value)} entries (max {MAX_BLOCKS_PER_EVENT})")
    if all(type(h) is int and 0 <= h <= U64_MASK for h in value):
        return value
    return [block_hash(h) for h in value]


def _opt_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise _Invalid(f"{field} is {type(value).__name__}, want an int")
    return value


def _opt_str(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _Invalid(f"{field} is {type(value).__name__}, want a string")
    return value


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(tag, fields by name) of an event in either encoding."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        if not isinstance(tag, str):
            raise _Invalid('map event without a string "type"')
        return tag, raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        return raw[0], dict(zip(names, raw[1:], strict=False))  # older engines send fewer fields
    raise _Invalid(f"event is {type(raw).__name__}, want a tagged array or a map")


def _tag_of(raw: Any) -> str | None:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        return None
    return tag if isinstance(tag, str) else None


def decode_event(raw: Any) -> EngineEvent:
    tag = _tag_of(raw)
    try:
        if tag == "BlockStored" or tag == "BlockStoredWithMetadata":
            _, f = _fields(raw, STORED_FIELDS)
            if "block_hashes" not in f:
                raise _Invalid("BlockStored without block_hashes")
            tokens = f.get("token_ids") or []
            if not isinstance(tokens, list):
                raise _Invalid(f"token_ids is {type(tokens).__name__}, want a list")
            if len(tokens) > MAX_TOKENS_PER_EVENT:
                raise _Invalid(f"token_ids has {len(tokens)} entries (max {MAX_TOKENS_PER_EVENT})")
            parent = f.get("parent_block_hash")
            extra = f.get("extra_keys")
            return BlockStored(
                block_hashes=_hash_list(f["block_hashes"], "block_hashes"),
                parent_block_hash=None if parent is None else block_hash(parent),
                token_ids=tokens,
                block_size=_opt_int(f.get("block_size"), "block_size"),
                medium=_opt_str(f.get("medium"), "medium"),
                lora_name=_opt_str(f.get("lora_name"), "lora_name"),
                cache_salt=_opt_str(f.get("cache_salt"), "cache_salt"),
                extra_keys=extra if isinstance(extra, list) else None,
                group_idx=_opt_int(f.get("group_idx"), "group_idx"),
            )
        if tag == "BlockRemoved":
            _, f = _fields(raw, REMOVED_FIELDS)
            if "block_hashes" not in f:
                raise _Invalid("BlockRemoved without block_hashes")
            return BlockRemoved(
                block_hashes=_hash_list(f["block_hashes"], "block_hashes"),
                medium=_opt_str(f.get("medium"), "medium"),
                group_idx=_opt_int(f.get("group_idx"), "group_idx"),
            )
        if tag == "AllBlocksCleared":
            _, f = _fields(raw, CLEARED_FIELDS)
            return AllBlocksCleared(medium=_opt_str(f.get("medium"), "medium"))
    except _Invalid as exc:
        return BadEvent("bad_event", str(exc))
    if tag is None:
        return BadEvent("bad_event", f"event is {type(raw).__name__}, want a tagged array or a map")
    return BadEvent("unknown_event", f"unknown event type {tag[:64]!r}")


def decode_batch(payload: bytes | memoryview) -> EngineBatch:
    """Decode one batch payload; raises `BadBatch` when the envelope itself is unreadable."""
    try:
        obj = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadBatch("bad_msgpack", str(exc)) from None
    if isinstance(obj, list):
        if len(obj) < 2:
            raise BadBatch("bad_envelope", f"envelope array has {len(obj)} items, want [ts, events, dp_rank]")
        ts, events = obj[0], obj[1]
        rank = obj[2] if len(obj) > 2 else None
    elif isinstance(obj, dict):
        if "events" not in obj:
            raise BadBatch("bad_envelope", 'envelope map without "events"')
        ts, events = obj.get("ts"), obj["events"]
        rank = next((obj[k] for k in RANK_KEYS if obj.get(k) is not None), None)
    else:
        raise BadBatch("bad_envelope", f"envelope is {type(obj).__name__}, want an array or a map")
    if not isinstance(events, list):
        raise BadBatch("bad_envelope", f"events is {type(events).__name__}, want a list")
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise BadBatch("bad_envelope", f"{len(events)} events in one batch (max {MAX_EVENTS_PER_BATCH})")
    if ts is not None and not isinstance(ts, (int, float)):
        raise BadBatch("bad_envelope", f"ts is {type(ts).__name__}, want a number")
    if rank is not None and (type(rank) is not int or rank < 0):
        raise BadBatch("bad_envelope", f"dp rank {rank!r} is not a non-negative int")
    return EngineBatch(ts=None if ts is None else float(ts), events=[decode_event(e) for e in events], dp_rank=rank)
