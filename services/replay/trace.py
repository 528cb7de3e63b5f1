"""Mooncake FAST'25 traces (`{timestamp, input_length, output_length, hash_ids}` per line) and the
deterministic expansion of their 512-token hash ids into token ids.

Trace files are JSON lines, plain or gzip-compressed (the copies shipped in `data/` are `.jsonl.gz`);
`open_trace` tells them apart by the gzip magic bytes, not by the file name.

Every hash id becomes a fixed pseudo-random 512-token chunk (seeded by the id and a run salt), so two
requests that share their first k ids share their first k·512 tokens exactly and nothing else; the
engine then re-blocks those tokens at its own block size (Dynamo's `--trace-block-size 512`).
"""

from __future__ import annotations

import gzip
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

TRACE_BLOCK = 512
VOCAB = 32_000
GZIP_MAGIC = b"\x1f\x8b"


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRequest:
    index: int  # line number (0-based) in the trace file
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_line(line: str, index: int) -> TraceRequest:
    try:
        obj = json.loads(line)
        ts, isl, osl, ids = obj["timestamp"], obj["input_length"], obj["output_length"], obj["hash_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"line {index + 1}: not a Mooncake record ({exc})") from None
    if not all(isinstance(v, int) and v >= 0 for v in (ts, isl, osl)) or isl == 0:
        raise TraceError(f"line {index + 1}: timestamp/input_length/output_length must be non-negative integers")
    if not isinstance(ids, list) or not all(isinstance(h, int) and h >= 0 for h in ids):
        raise TraceError(f"line {index + 1}: hash_ids must be a list of non-negative integers")
    if len(ids) * TRACE_BLOCK < isl:
        raise TraceError(f"line {index + 1}: {len(ids)} hash ids cannot cover {isl} input tokens")
    return TraceRequest(index, ts, isl, osl, tuple(ids))


def open_trace(path: str | Path) -> TextIO:
    """The trace's text lines, whether the file is plain JSON lines or gzip-compressed."""
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_trace(path: str | Path, *, start: int = 0, limit: int | None = None) -> list[TraceRequest]:
    """Requests `start .. start+limit` of the file, timestamps kept as in the file."""
    out: list[TraceRequest] = []
    with open_trace(path) as fh:
        for index, line in enumerate(fh):
            if index < start or not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(parse_line(line, index))
    if not out:
        raise TraceError(f"{path}: no requests in the selected range")
    return out


class TokenExpander:
    """hash id → its 512 tokens (cached LRU), request → its prompt token ids."""

    def __init__(self, salt: int = 0, cache_size: int = 65_536, vocab: int = VOCAB) -> None:
        self.salt = salt
        self.vocab = vocab
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def chunk(self, hash_id: int) -> np.ndarray:
        arr = self._cache.get(hash_id)
        if arr is not None:
            self._cache.move_to_end(hash_id)
            return arr
        rng = np.random.default_rng([self.salt, hash_id])
        arr = rng.integers(0, self.vocab, TRACE_BLOCK, dtype=np.uint32)
        self._cache[hash_id] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def tokens(self, req: TraceRequest) -> list[int]:
        needed = -(-req.input_length // TRACE_BLOCK)
        chunks = [self.chunk(h) for h in req.hash_ids[:needed]]
        return np.concatenate(chunks)[: req.input_length].tolist()


def ideal_hit_rate(requests: Iterable[TraceRequest]) -> float:
    """Prefix tokens reusable with an infinite, shared cache (the trace's ceiling, see data/README.md)."""
    seen: set[int] = set()
    prompt = cached = 0
    for r in requests:
        run = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            run += 1
        cached += min(run * TRACE_BLOCK, r.input_length)
        prompt += r.input_length
        seen.update(r.hash_ids)
    return cached / prompt if prompt else 0.0


def synthetic_trace(n: int = 300, *, groups: int = 12, prefix_blocks: int = 12, seed: int = 0,
                    rate_per_s: float = 4.0) -> list[TraceRequest]:
    """A small Mooncake-format shared-prefix workload (used when no trace file is at hand): each
    request takes one of `groups` shared system prompts of `prefix_blocks` blocks, then 1–8 private
    blocks; arrivals are Poisson."""
    rng = np.random.default_rng(seed)
    next_id = groups * prefix_blocks
    out: list[TraceRequest] = []
    t = 0.0
    for i in range(n):
        g = int(rng.integers(groups))
        private = int(rng.integers(1, 9))
        ids = tuple(range(g * prefix_blocks, (g + 1) * prefix_blocks)) + tuple(range(next_id, next_id + private))
        next_id += private
        isl = len(ids) * TRACE_BLOCK - int(rng.integers(0, TRACE_BLOCK))
        out.append(TraceRequest(i, int(t), isl, int(rng.integers(16, 256)), ids))
        t += float(rng.exponential(1000.0 / rate_per_s))
    return out


def write_trace(requests: Iterable[TraceRequest], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                                 "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")
    return path
