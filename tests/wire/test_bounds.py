"""Every number in every wire type is bounded, so whatever a service accepts can be snapshotted
(msgpack: 64 bits at most) and replayed, and out-of-range numbers are refused at the door."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from schemas import codec
from schemas.api import SelectRequest
from schemas.codec import SchemaError
from schemas.events import RouterEvent, stored_event
from schemas.export import MESSAGES
from schemas.types import HASH_DESCRIPTION, I64_MAX, U64_MASK
from services.indexer.index import PrefixIndex
from services.indexer.treecodec import decode_snapshot, encode_snapshot


def _numbers(t: mi.Type, path: str, seen: set[type], out: list[tuple[str, mi.Type]], note: str = "") -> None:
    if isinstance(t, mi.Metadata):
        _numbers(t.type, path, seen, out, (t.extra_json_schema or {}).get("description", ""))
    elif isinstance(t, (mi.IntType, mi.FloatType)):
        out.append((path + (" #hash" if note == HASH_DESCRIPTION else ""), t))
    elif isinstance(t, mi.StructType):
        if t.cls in seen:
            return
        seen.add(t.cls)
        for f in t.fields:
            _numbers(f.type, f"{path}.{f.name}", seen, out)
    elif isinstance(t, mi.UnionType):
        for i, sub in enumerate(t.types):
            _numbers(sub, f"{path}|{i}", seen, out)
    elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        _numbers(t.item_type, f"{path}[]", seen, out)
    elif isinstance(t, mi.TupleType):
        for i, sub in enumerate(t.item_types):
            _numbers(sub, f"{path}[{i}]", seen, out)
    elif isinstance(t, mi.DictType):
        _numbers(t.key_type, f"{path}{{key}}", seen, out)
        _numbers(t.value_type, f"{path}{{}}", seen, out)
    # AnyType (free-form JSON such as an OpenAI body) is passed through, never folded into state.


def _all_numbers() -> list[tuple[str, str, mi.Type]]:
    out: list[tuple[str, str, mi.Type]] = []
    for name, type_ in MESSAGES.items():
        found: list[tuple[str, mi.Type]] = []
        _numbers(mi.type_info(type_), "$", set(), found)
        out.extend((name, path, t) for path, t in found)
    return out


NUMBERS = _all_numbers()


def test_the_walk_finds_the_numbers() -> None:
    paths = {(name, path) for name, path, _ in NUMBERS}
    assert ("RouterEvent", "$.event.event_id") in paths
    assert ("WorkerRecord", "$.heartbeat_ms") in paths
    assert len(NUMBERS) > 60


@pytest.mark.parametrize(("name", "path", "t"), NUMBERS, ids=[f"{n}:{p}" for n, p, _ in NUMBERS])
def test_every_number_has_a_lower_and_upper_bound_within_64_bits(name: str, path: str, t: Any) -> None:
    lower = t.ge if t.ge is not None else t.gt
    upper = t.le if t.le is not None else t.lt
    if path.endswith(" #hash"):
        upper = U64_MASK  # checked by the struct's __post_init__ (msgspec bounds stop at i64); tested below
    assert lower is not None and upper is not None, f"{name} {path} is unbounded"
    if isinstance(t, mi.IntType):
        assert lower >= -(1 << 63) and upper <= U64_MASK, f"{name} {path} does not fit 64 bits"
    else:
        assert abs(lower) < float("inf") and abs(upper) < float("inf")


@pytest.mark.parametrize("value", [I64_MAX + 1, U64_MASK, U64_MASK + 1, 1 << 100, -1])
def test_event_id_out_of_range_is_refused_in_json_and_msgpack(value: int) -> None:
    good = msgspec.to_builtins(stored_event(1, 5, [(1, 2)]))
    good["event"]["event_id"] = value
    with pytest.raises(SchemaError) as err:
        codec.decode(msgspec.json.encode(good), RouterEvent)
    assert err.value.path == "$.event.event_id"
    if -(1 << 63) <= value <= U64_MASK:  # msgpack itself cannot carry wider integers
        with pytest.raises(SchemaError):
            codec.decode(msgspec.msgpack.encode(good), RouterEvent, codec.MSGPACK)


@pytest.mark.parametrize("field", ["block_hash", "tokens_hash"])
def test_hashes_wider_than_64_bits_are_refused(field: str) -> None:
    good = msgspec.to_builtins(stored_event(1, 5, [(1, 2)]))
    good["event"]["data"]["stored"]["blocks"][0][field] = U64_MASK + 1
    with pytest.raises(SchemaError):
        codec.decode(msgspec.json.encode(good), RouterEvent)
    good["event"]["data"]["stored"]["blocks"][0][field] = U64_MASK
    assert codec.decode(msgspec.json.encode(good), RouterEvent).event.event_id == 5


def test_largest_accepted_numbers_survive_a_snapshot_and_replay() -> None:
    """The bug this guards: one accepted event with event_id >= 2**64 made every later snapshot fail."""
    index = PrefixIndex()
    big = codec.decode(
        msgspec.json.encode(msgspec.to_builtins(stored_event(2**53 - 1, I64_MAX, [(U64_MASK, U64_MASK - 1)], dp_rank=65535))),
        RouterEvent,
    )
    index.apply(big)
    restored, seq, _ = decode_snapshot(encode_snapshot(index, I64_MAX))
    assert seq == I64_MAX
    assert restored.dump() == index.dump()
    assert restored.cursors == {(2**53 - 1, 65535): I64_MAX}


def test_plain_counts_stop_at_i64() -> None:
    with pytest.raises(SchemaError) as err:
        codec.decode(b'{"request_id": "r", "token_ids": [1], "isl_tokens": 9223372036854775808}', SelectRequest)
    assert err.value.path == "$.isl_tokens"
    ok = codec.decode(b'{"request_id": "r", "token_ids": [1], "isl_tokens": 9223372036854775807}', SelectRequest)
    assert ok.isl_tokens == I64_MAX
