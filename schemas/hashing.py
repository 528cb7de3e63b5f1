"""Dynamo-compatible block hashing (docs/protocol.md §6).

Local block hash: XXH3-64 of the block's token ids packed little-endian u32, seeded with 1337
(or the LoRA / cache-salt seed); a block that multimodal objects overlap hashes its token bytes
followed by their sorted mm hashes (u64 little-endian). Sequence hash: chain of local hashes, always
seeded with 1337. `cache_namespace` is Dynamo's name for the cache salt: the same seed term.
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

# A multimodal object of a request: (mm_hash, first token position, length in tokens).
MmObject = tuple[int, int, int]


def salt_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Seed for local hashes: 1337 + xxh3(lora, 0) + xxh3(salt, 1) mod 2**64; empty = absent."""
    seed = SEED
    if lora_name:
        seed = (seed + _xxh3(lora_name.encode(), seed=0)) & U64_MASK
    if cache_salt:
        seed = (seed + _xxh3(cache_salt.encode(), seed=1)) & U64_MASK
    return seed


def effective_salt(cache_salt: str | None, cache_namespace: str | None) -> str | None:
    """The one salt of a request that may name it `cache_salt` (vLLM, ours) or `cache_namespace`
    (Dynamo): both hash alike; empty strings count as absent; two different ones are an error."""
    if cache_salt and cache_namespace and cache_salt != cache_namespace:
        raise ValueError('"cache_salt" and "cache_namespace" differ; give one (they are the same salt)')
    return cache_salt or cache_namespace or None


def block_mm_hashes(multimodal: Sequence[MmObject], block_size: int, n_tokens: int) -> dict[int, list[int]]:
    """Block index → the sorted, distinct mm hashes of the objects whose token range
    [offset, offset + length) overlaps that block (Dynamo's `RequestExtraInfo::to_block_level`:
    only blocks within the prompt, a zero-length range touches nothing)."""
    out: dict[int, set[int]] = {}
    if block_size <= 0 or n_tokens <= 0:
        return {}
    last_block = (n_tokens - 1) // block_size
    for mm_hash, offset, length in multimodal:
        end = min(offset + length, n_tokens)
        if length <= 0 or offset >= end:
            continue
        for b in range(offset // block_size, min((end - 1) // block_size, last_block) + 1):
            out.setdefault(b, set()).add(mm_hash & U64_MASK)
    return {b: sorted(h) for b, h in out.items()}


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("I", tokens)  # raises OverflowError for ids outside u32
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def _mm_hash(block_bytes: bytes, seed: int, mm_hashes: Sequence[int]) -> int:
    return _xxh3(block_bytes + struct.pack(f"<{len(mm_hashes)}Q", *mm_hashes), seed)


def mm_block_hash(block_tokens: Sequence[int], seed: int, mm_hashes: Sequence[int]) -> int:
    """One block's local hash with its multimodal objects' sorted, distinct mm hashes appended."""
    return _mm_hash(_token_bytes(block_tokens), seed, mm_hashes)


def local_block_hashes(
    tokens: Sequence[int], block_size: int, seed: int = SEED, multimodal: Sequence[MmObject] | None = None
) -> list[int]:
    """One hash per *full* block; a trailing partial block is not hashed. With `multimodal`, a block
    that objects overlap hashes its token bytes followed by their sorted mm hashes as u64 LE."""
    if block_size <= 0:
        return []
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        return []
    raw = _token_bytes(tokens[: n_blocks * block_size] if len(tokens) != n_blocks * block_size else tokens)
    step = 4 * block_size
    # Positional seed: keyword parsing in the C call costs ≈ 30 % of a per-block hash here.
    out = [_xxh3(raw[i : i + step], seed) for i in range(0, n_blocks * step, step)]
    if multimodal:
        for b, mm in block_mm_hashes(multimodal, block_size, len(tokens)).items():
            if b < n_blocks:
                out[b] = _mm_hash(raw[b * step : (b + 1) * step], seed, mm)
    return out


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
    tokens: Sequence[int],
    block_size: int,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    multimodal: Sequence[MmObject] | None = None,
) -> tuple[list[int], list[int]]:
    """(local block hashes, sequence hashes) of a request's prompt."""
    local = local_block_hashes(tokens, block_size, salt_seed(lora_name, cache_salt), multimodal)
    return local, sequence_hashes(local)
