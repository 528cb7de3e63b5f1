"""Block hashing (docs/protocol.md §6): published vectors and properties."""

from __future__ import annotations

import struct

import xxhash
from hypothesis import given
from hypothesis import strategies as st

from schemas.hashing import SEED, local_block_hashes, request_hashes, salt_seed, sequence_hashes

tokens_strategy = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)


def test_xxh3_vector():
    assert xxhash.xxh3_64_intdigest(b"test data", seed=1337) == 13226331709069118873


def test_protocol_vectors_tokens_1_to_32():
    local = local_block_hashes(list(range(1, 33)), 16)
    assert local == [16863443419780771464, 2287610619914608821]
    assert sequence_hashes(local) == [16863443419780771464, 12466389667045779788]


def test_block_size_4_and_lora_vectors():
    local = local_block_hashes(list(range(8)), 4)
    assert local == [9143094415614847814, 12124091508212882195]
    assert sequence_hashes(local) == [9143094415614847814, 9510318385840434533]
    assert salt_seed("adapter-a") == 8842669519798868182
    assert local_block_hashes(list(range(8)), 4, salt_seed("adapter-a")) == [6665157333201000639, 11721812545976571723]


def test_reference_formula():
    tokens = [5, 6, 7, 8]
    assert local_block_hashes(tokens, 4) == [xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens), seed=SEED)]


@given(tokens_strategy, st.integers(min_value=1, max_value=32))
def test_only_full_blocks_are_hashed(tokens, block_size):
    hashes = local_block_hashes(tokens, block_size)
    assert len(hashes) == len(tokens) // block_size
    # appending a partial block never changes anything
    assert local_block_hashes(tokens + [1] * (block_size - 1), block_size)[: len(hashes)] == hashes


@given(tokens_strategy, st.integers(min_value=1, max_value=16))
def test_blocks_hash_independently(tokens, block_size):
    hashes = local_block_hashes(tokens, block_size)
    for i, h in enumerate(hashes):
        assert h == local_block_hashes(tokens[i * block_size : (i + 1) * block_size], block_size)[0]


@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=64), st.text(min_size=1, max_size=20))
def test_salting_changes_hashes_and_empty_salt_is_none(tokens, salt):
    plain = local_block_hashes(tokens, 4)
    assert local_block_hashes(tokens, 4, salt_seed(lora_name=salt)) != plain
    assert local_block_hashes(tokens, 4, salt_seed(cache_salt=salt)) != plain
    assert salt_seed("", "") == salt_seed(None, None) == SEED
    assert request_hashes(tokens, 4, "", "") == request_hashes(tokens, 4)
    # sequence chaining always uses 1337: the salt enters only through the local hashes
    salted = local_block_hashes(tokens, 4, salt_seed(cache_salt=salt))
    assert request_hashes(tokens, 4, cache_salt=salt)[1] == sequence_hashes(salted)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=20, unique=True))
def test_chaining_depends_on_order(local):
    seq = sequence_hashes(local)
    assert seq[0] == local[0]
    assert sequence_hashes(list(reversed(local)))[-1] != seq[-1] or len(set(local)) < 2
    # prefix property: the chain of a prefix is a prefix of the chain
    assert sequence_hashes(local[:-1]) == seq[:-1]


def test_block_size_zero_and_empty():
    assert local_block_hashes([1, 2, 3], 0) == []
    assert local_block_hashes([], 16) == []
    assert sequence_hashes([]) == []
