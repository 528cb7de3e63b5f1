"""Dynamo-compatible block hashing (docs/protocol.md §6).

Local block hash: XXH3-64 of the block's token ids packed little-endian u32, seeded with 1337
(or the LoRA / cache-salt seed). Sequence hash: chain of local hashes, always seeded with 1337.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

SEED = 1337
U64_MASK = (1 << 64) - 1

_xxh3 = xxhash.xxh3_64_intdigest
_pack_qq = struct.Struct("<QQ").pack


def salt_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Seed for local hashes: 1337 + xxh3(lora, 0) + xxh3(salt, 1) mod 2**64; empty = absent."""
    seed = SEED
    if lora_name:
        seed = (seed + _xxh3(lora_name.encode(), seed=0)) & U64_MASK
    if cache_salt:
        seed = (seed + _xxh3(cache_salt.encode(), seed=1)) & U64_MASK
    return seed


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("I", tokens)  # raises OverflowError for ids outside u32
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def local_block_hashes(tokens: Sequence[int], block_size: int, seed: int = SEED) -> list[int]:
    """One hash per *full* block; a trailing partial block is not hashed."""
    if block_size <= 0:
        return []
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        return []
    raw = _token_bytes(tokens[: n_blocks * block_size] if len(tokens) != n_blocks * block_size else tokens)
    step = 4 * block_size
    # Positional seed: keyword parsing in the C call costs ≈ 30 % of a per-block hash here.
    return [_xxh3(raw[i : i + step], seed) for i in range(0, n_blocks * step, step)]


def sequence_hashes(local: Sequence[int]) -> list[int]:
    """seq[0] = local[0]; seq[i] = xxh3(le_u64(seq[i-1]) + le_u64(local[i]), seed=1337)."""
    if not local:
        return []
    prev = local[0]
    out = [prev]
    append = out.append
    for h in local[1:]:
        prev = _xxh3(_pack_qq(prev, h), SEED)
        append(prev)
    return out


def request_hashes(
    tokens: Sequence[int], block_size: int, lora_name: str | None = None, cache_salt: str | None = None
) -> tuple[list[int], list[int]]:
    """(local block hashes, sequence hashes) of a request's prompt."""
    local = local_block_hashes(tokens, block_size, salt_seed(lora_name, cache_salt))
    return local, sequence_hashes(local)
