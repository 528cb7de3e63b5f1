"""A fake vLLM engine speaking vLLM's exact KV-event wire format (`vllm/distributed/kv_events.py`).

- PUB socket (an XPUB, which subscribers cannot tell apart, so tests can wait for the subscription)
  sending `[topic, seq (8-byte big-endian), msgpack payload]`, seq from 0 per process;
- envelope `KVEventBatch(ts, events, data_parallel_rank)` as msgspec `array_like=True, omit_defaults`;
- events in both encodings: "legacy" (vLLM ≤ 0.25: tagged positional arrays) and "map"
  (≥ 0.26: maps with `"type"`), declared as msgspec structs exactly like vLLM's;
- ROUTER replay socket: request `[identity, b"", start_seq]`, reply one frame set per buffered
  batch with seq ≥ start, then the end marker seq = -1 with an empty payload; `replay_with_topic`
  selects the ≥ 0.26 reply shape `[topic, seq, payload]` over the older `[seq, payload]`.

Engine block hashes are the low 64 bits of sha256(parent, tokens, extra) — opaque to the relay,
like vLLM's. `hash_bytes=True` sends the full 32-byte digests instead (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

END_SEQ = (-1).to_bytes(8, "big", signed=True)
ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


# vLLM ≤ 0.25: tagged, array-like events.
class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(LegacyEvent, tag="BlockStored"):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None


class LegacyBlockRemoved(LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class LegacyAllBlocksCleared(LegacyEvent, tag="AllBlocksCleared"):
    pass


# vLLM ≥ 0.26 (PR #42892): tagged maps with "type".
class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True, tag_field="type"):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


_encoder = msgspec.msgpack.Encoder()


def engine_hash(parent: bytes | None, tokens: list[int], extra: Any = None) -> bytes:
    h = hashlib.sha256()
    h.update(parent or b"NONE_HASH")
    h.update(repr((tuple(tokens), extra)).encode())
    return h.digest()


class FakeEngine:
    def __init__(
        self,
        pub_port: int,
        replay_port: int | None = None,
        *,
        topic: str = "",
        encoding: str = "legacy",
        dp_rank: int = 0,
        block_size: int = 16,
        buffer_steps: int = 10_000,
        hash_bytes: bool = False,
        replay_with_topic: bool = True,
    ) -> None:
        assert encoding in ("legacy", "map")
        self.pub_port = pub_port
        self.replay_port = replay_port
        self.topic = topic.encode()
        self.encoding = encoding
        self.dp_rank = dp_rank
        self.block_size = block_size
        self.buffer_steps = buffer_steps
        self.hash_bytes = hash_bytes
        self.replay_with_topic = replay_with_topic
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.drop_next = 0  # batches to number and buffer but not send (a PUB-side drop)
        self.ctx: zmq.asyncio.Context | None = None  # made by start(): an engine that only encodes events opens nothing
        self.pub: zmq.asyncio.Socket | None = None
        self.router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.replay_requests: list[int] = []
        # digest of every cached block → its tokens, to emit realistic chained hashes
        self.blocks: dict[bytes, list[int]] = {}

    # -- sockets -------------------------------------------------------------------------------

    def start(self) -> FakeEngine:
        self.ctx = ctx = zmq.asyncio.Context()
        try:
            self.pub = ctx.socket(zmq.XPUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, even a repeated one
            self.pub.bind(f"tcp://127.0.0.1:{self.pub_port}")
            if self.replay_port is not None:
                self.router = ctx.socket(zmq.ROUTER)
                self.router.setsockopt(zmq.LINGER, 0)
                self.router.bind(f"tcp://127.0.0.1:{self.replay_port}")
        except BaseException:  # a port taken: nothing may stay open
            ctx.destroy(linger=0)
            raise
        if self.router is not None:
            self._replay_task = asyncio.create_task(self._serve_replay())
        return self

    async def wait_subscribed(self, timeout: float = 5.0) -> None:
        assert self.pub is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:  # skip unsubscribe messages (b"\x00...") of subscribers that left
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await self.pub.poll(int(left * 1000)):
                raise TimeoutError("no subscriber connected to the fake engine")
            if (await self.pub.recv()).startswith(b"\x01"):
                return

    async def close(self) -> None:
        try:
            if self._replay_task is not None:
                self._replay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._replay_task
        finally:
            # destroy: closes (linger 0) every socket still open, even one of a failed start, which
            # would make term() block forever
            if self.ctx is not None:
                self.ctx.destroy(linger=0)
            self.pub = self.router = None

    def restart_numbering(self) -> None:
        """What a process restart looks like on the wire: seq from 0, empty replay buffer and cache."""
        self.seq = 0
        self.buffer.clear()
        self.blocks.clear()

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start_b = frames
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            for seq, payload in list(self.buffer):
                if seq >= start:
                    seq_b = seq.to_bytes(8, "big")
                    head = [client, b"", self.topic] if self.replay_with_topic else [client, b""]
                    await self.router.send_multipart([*head, seq_b, payload])
            head = [client, b"", self.topic] if self.replay_with_topic else [client, b""]
            await self.router.send_multipart([*head, END_SEQ, b""])

    # -- publishing ----------------------------------------------------------------------------

    async def send_raw(self, frames: list[bytes]) -> None:
        assert self.pub is not None
        await self.pub.send_multipart(frames)

    async def publish(self, events: list[Any]) -> int:
        """Publish one batch of already-built event structs; returns its seq."""
        payload = _encoder.encode(EventBatch(ts=time.time(), events=events, data_parallel_rank=self.dp_rank))
        return await self.publish_payload(payload)

    async def publish_payload(self, payload: bytes) -> int:
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        del self.buffer[: -self.buffer_steps]
        if self.drop_next > 0:
            self.drop_next -= 1
        else:
            await self.send_raw([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def _ext(self, digest: bytes) -> ExternalBlockHash:
        return digest if self.hash_bytes else int.from_bytes(digest[-8:], "big")

    def stored(
        self,
        tokens: list[int],
        parent: bytes | None = None,
        *,
        medium: str | None = "GPU",
        lora_name: str | None = None,
        cache_salt: str | None = None,
        group_idx: int | None = None,
        token_less: bool = False,
    ) -> tuple[Any, list[bytes]]:
        """A BlockStored for the full blocks of `tokens` after `parent`; returns (event, digests)."""
        bs = self.block_size
        digests: list[bytes] = []
        prev = parent
        extra_keys: list[tuple[Any, ...] | None] = []
        for i in range(len(tokens) // bs):
            chunk = tokens[i * bs : (i + 1) * bs]
            keys: tuple[Any, ...] = ()
            if lora_name:
                keys += (lora_name,)
            if cache_salt and i == 0 and parent is None:
                keys += (cache_salt,)
            extra_keys.append(keys or None)
            prev = engine_hash(prev, chunk, keys)
            self.blocks[prev] = chunk
            digests.append(prev)
        hashes = [self._ext(d) for d in digests]
        parent_ext = None if parent is None else self._ext(parent)
        ids = [] if token_less else tokens[: len(digests) * bs]
        extra = extra_keys if any(extra_keys) else None
        if self.encoding == "legacy":
            ev: Any = LegacyBlockStored(hashes, parent_ext, ids, bs, None, medium, lora_name, extra)
        else:
            ev = MapBlockStored(hashes, parent_ext, ids, bs, None, medium, lora_name, extra, group_idx, "full_attention")
        return ev, digests

    def removed(self, digests: list[bytes], medium: str | None = "GPU", group_idx: int | None = None) -> Any:
        hashes = [self._ext(d) for d in digests]
        if self.encoding == "legacy":
            return LegacyBlockRemoved(hashes, medium, group_idx)
        return MapBlockRemoved(hashes, medium, group_idx)

    def cleared(self) -> Any:
        return LegacyAllBlocksCleared() if self.encoding == "legacy" else MapAllBlocksCleared()


class BlockPoolSim:
    """vLLM's prefix-cache block pool as far as its KV events go (vllm/v1/core/block_pool.py).

    Per KV-cache group: `capacity` blocks, cached full blocks kept after their request and evicted
    least recently used first; a newly cached block is a `BlockStored`, an eviction one
    `BlockRemoved` per hash (and group). With `full_report` (a request sent with
    `kv_cache_report_mode="full"`) the cached prefix a request reuses is reported again as a
    `BlockStored`, once per group, with no matching removal. `cached()` is the truth an index fed by
    these events must end with: the blocks some group still holds.
    """

    def __init__(self, eng: FakeEngine, capacity: int | dict[int | None, int], groups: tuple[int | None, ...] = (None,)) -> None:
        self.eng = eng
        self.groups = groups
        self.capacity = capacity if isinstance(capacity, dict) else dict.fromkeys(groups, capacity)
        self.lru: dict[int | None, dict[bytes, None]] = {g: {} for g in groups}  # insertion order = LRU order

    def cached(self) -> set[int]:
        return {int.from_bytes(d[-8:], "big") for lru in self.lru.values() for d in lru}

    def request(self, tokens: list[int], full_report: bool = False) -> list[Any]:
        bs = self.eng.block_size
        chunks = [tokens[i * bs : (i + 1) * bs] for i in range(len(tokens) // bs)]
        digests: list[bytes] = []
        prev: bytes | None = None
        for chunk in chunks:
            prev = engine_hash(prev, chunk, ())
            digests.append(prev)
        mine = set(digests)
        events: list[Any] = []
        for g in self.groups:
            lru = self.lru[g]
            hit = 0
            while hit < len(digests) and digests[hit] in lru:
                hit += 1
            if full_report and hit:
                events.append(self.eng.stored(tokens[: hit * bs], group_idx=g)[0])
            for i in range(hit, len(digests)):
                while len(lru) >= self.capacity[g]:
                    victim = next((d for d in lru if d not in mine), None)
                    if victim is None:
                        break  # everything cached belongs to this request: keep it (over capacity)
                    del lru[victim]
                    events.append(self.eng.removed([victim], group_idx=g))
                parent = digests[i - 1] if i else None
                ev, made = self.eng.stored(chunks[i], parent=parent, group_idx=g)
                assert made == [digests[i]]
                events.append(ev)
                lru[digests[i]] = None
            # vLLM frees a request's blocks tail first, so a prefix outlives its continuations and
            # the cache stays prefix-closed (no second physical copy of a hash is ever made here).
            for d in reversed(digests):
                lru.pop(d, None)
                lru[d] = None
        return events
