"""Index snapshots in the KVR_SNAPSHOTS object store: object `{pool}.index`, msgpack.

Contents (see `treecodec.encode_snapshot`): the tree as parallel arrays, every (worker, dp_rank, tier)
entry list, the event-id cursors, and `stream_seq` — the KVR_KV sequence the snapshot covers. A
restored indexer resumes the stream at `stream_seq + 1`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .index import PrefixIndex
from .treecodec import decode_snapshot, encode_snapshot, encode_state


@dataclass
class LoadedSnapshot:
    index: PrefixIndex
    stream_seq: int
    size: int
    seconds: float
    written_at: float
    admission: dict[str, Any] | None = None  # see admission.Admission.to_state (absent in older snapshots)


async def load(js: JetStreamContext, bucket: str, name: str) -> LoadedSnapshot | None:
    """The stored snapshot, or None when there is none. A corrupt object raises ValueError."""
    store = await js.object_store(bucket)
    started = time.perf_counter()
    try:
        result = await store.get(name)
    except NotFoundError:
        return None
    data = result.data or b""
    try:
        index, seq, state = decode_snapshot(data)
    except Exception as exc:  # noqa: BLE001 - any undecodable object is a corrupt snapshot, not a crash
        raise ValueError(f"corrupt snapshot {name}: {type(exc).__name__}: {exc}") from None
    admission = state.get("admission")
    return LoadedSnapshot(
        index, seq, len(data), time.perf_counter() - started, float(state.get("written_at", 0.0)),
        admission if isinstance(admission, dict) else None,
    )  # fmt: skip


def serialise(index: PrefixIndex, stream_seq: int) -> bytes:
    return encode_snapshot(index, stream_seq, {"written_at": time.time()})


# Nodes or entries per piece: ≈ 10 ms of work, so a match waits at most about that long.
PIECE = 10_000


async def serialise_cooperatively(index: PrefixIndex, stream_seq: int, extra: dict[str, Any] | None = None) -> bytes:
    """`serialise`, yielding to the event loop between pieces of the tree walk, so matches keep being
    answered. The caller keeps events from being applied until this returns."""
    steps = index.snapshot_steps(PIECE)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            state = done.value
            break
        await asyncio.sleep(0)
    return encode_state(state, stream_seq, {"written_at": time.time(), **(extra or {})})


async def upload(js: JetStreamContext, bucket: str, name: str, data: bytes) -> None:
    store = await js.object_store(bucket)
    await store.put(name, data)
