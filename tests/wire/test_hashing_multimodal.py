"""Multimodal block hashing and `cache_namespace` (docs/protocol.md §6), against an independent
implementation of Dynamo's rule written here from its description: the request's objects are split
per block (Dynamo's `RequestExtraInfo::to_block_level`: half-open token ranges, one entry per
distinct mm hash in a block), and a block with objects hashes its token bytes (u32 LE) followed by
its objects' mm hashes sorted ascending (u64 LE), with the request's seed."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from schemas.hashing import SEED, block_mm_hashes, effective_salt, local_block_hashes, request_hashes, salt_seed

U64 = (1 << 64) - 1


def dynamo_block_level(mm: list[tuple[int, int, int]], block_size: int, total: int) -> list[list[int] | None]:
    """Per block: the mm hashes of the objects in it, in first-seen order (None: no object)."""
    n_blocks = -(-total // block_size)
    blocks: list[list[int] | None] = [None] * n_blocks
    for mm_hash, offset, length in mm:
        start, end = offset, offset + length
        first = start // block_size
        last = max(end - 1, 0) // block_size
        for b in range(first, min(last, n_blocks - 1) + 1):
            lo = max(start, b * block_size) - b * block_size
            hi = min(end, min((b + 1) * block_size, total)) - b * block_size
            if lo < hi:
                if blocks[b] is None:
                    blocks[b] = []
                if mm_hash not in blocks[b]:
                    blocks[b].append(mm_hash)
    return blocks


def dynamo_local_hashes(tokens: list[int], block_size: int, seed: int, mm: list[tuple[int, int, int]]) -> list[int]:
    per_block = dynamo_block_level(mm, block_size, len(tokens)) if tokens else []
    out = []
    for b in range(len(tokens) // block_size):
        data = struct.pack(f"<{block_size}I", *tokens[b * block_size : (b + 1) * block_size])
        held = per_block[b]
        if held:
            data += b"".join(struct.pack("<Q", h) for h in sorted(held))
        out.append(xxhash.xxh3_64_intdigest(data, seed=seed))
    return out


def test_an_image_spanning_two_blocks_salts_both_and_only_them():
    tokens = list(range(12))
    image = 0xDEADBEEF_0BADF00D
    got = local_block_hashes(tokens, 4, SEED, [(image, 2, 4)])  # positions 2..5: blocks 0 and 1
    tail = struct.pack("<Q", image)
    assert got == [
        xxhash.xxh3_64_intdigest(struct.pack("<4I", 0, 1, 2, 3) + tail, seed=1337),
        xxhash.xxh3_64_intdigest(struct.pack("<4I", 4, 5, 6, 7) + tail, seed=1337),
        xxhash.xxh3_64_intdigest(struct.pack("<4I", 8, 9, 10, 11), seed=1337),  # untouched: as plain text
    ]


def test_two_objects_in_a_block_go_sorted_and_a_repeated_image_counts_once():
    tokens = list(range(8))
    a, b = 7, 3
    got = local_block_hashes(tokens, 8, SEED, [(a, 0, 2), (b, 4, 2), (a, 6, 1)])
    assert got == [xxhash.xxh3_64_intdigest(struct.pack("<8I", *tokens) + struct.pack("<QQ", 3, 7), seed=1337)]


def test_objects_beyond_the_prompt_or_empty_touch_nothing():
    tokens = list(range(8))
    assert local_block_hashes(tokens, 4, SEED, [(5, 8, 4), (6, 1, 0)]) == local_block_hashes(tokens, 4)
    assert block_mm_hashes([(5, 8, 4), (6, 1, 0)], 4, 8) == {}


mm_objects = st.lists(
    st.tuples(st.integers(0, U64), st.integers(0, 80), st.integers(0, 30)), max_size=5
)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=70), st.integers(1, 16), mm_objects, st.sampled_from([None, "a"]))
def test_matches_dynamos_rule(tokens, block_size, mm, lora):
    seed = salt_seed(lora)
    assert local_block_hashes(tokens, block_size, seed, mm) == dynamo_local_hashes(tokens, block_size, seed, mm)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=70), st.integers(1, 16))
def test_without_objects_hashes_are_unchanged(tokens, block_size):
    plain = local_block_hashes(tokens, block_size)
    assert local_block_hashes(tokens, block_size, SEED, []) == plain
    assert local_block_hashes(tokens, block_size, SEED, None) == plain
    assert request_hashes(tokens, block_size, multimodal=[]) == request_hashes(tokens, block_size)


def test_cache_namespace_is_the_salt():
    assert effective_salt(None, "ns") == effective_salt("ns", None) == effective_salt("ns", "ns") == "ns"
    assert effective_salt("", "") is None and effective_salt(None, None) is None
    assert effective_salt("", "ns") == "ns"
    # Dynamo's seed for a namespace: 1337 + xxh3(namespace, seed 1)
    assert salt_seed(None, "ns") == (1337 + xxhash.xxh3_64_intdigest(b"ns", seed=1)) & U64
    with pytest.raises(ValueError, match="differ"):
        effective_salt("a", "b")
