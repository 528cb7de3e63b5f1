"""Index snapshots in the KVR_SNAPSHOTS object store: object `{pool}.index`, msgpack.

Contents (see `treecodec.encode_snapshot`): the tree as parallel arrays, every (worker, dp_rank, tier)
entry list, the event-id cursors, and `stream_seq` — the KVR_KV sequence the snapshot covers. A
restored indexer resumes the stream at `stream_seq + 1`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
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


# Attempts at reading an object that keeps being replaced while it is read.
READ_ATTEMPTS = 8


async def read_object(js: JetStreamContext, bucket: str, name: str, attempts: int = READ_ATTEMPTS) -> bytes | None:
    """The object's bytes (one consistent version), or None when there is none.

    nats-py's `ObjectStore.get` reads the object's meta, then waits on an ordered consumer for that
    version's chunks. A writer that replaces the object in between (an indexer writing its next
    snapshot) purges those chunks, and the read waits for ever: a scheduler or indexer starting at
    that moment never became ready (found by tests/faults/). Here each chunk is one bounded request
    (`next_by_subj`); when the version's chunks are gone the read starts over with the newer version.
    A version is returned only whole and with the digest its meta names.
    """
    store = await js.object_store(bucket)
    stream = f"OBJ_{bucket}"
    for _ in range(attempts):
        try:
            info = await store.get_info(name)
        except NotFoundError:
            return None
        size = info.size or 0
        subject = f"$O.{bucket}.C.{info.nuid}"
        data = bytearray()
        seq = 1
        try:
            while len(data) < size:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
                data += msg.data or b""
                assert msg.seq is not None  # a stored message always has its sequence
                seq = msg.seq + 1
        except NotFoundError:
            await asyncio.sleep(0.05)
            continue  # replaced while we read it: read the newer version
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        if len(data) == size and (info.digest or "").split("=", 1)[-1] == digest:
            return bytes(data)
        await asyncio.sleep(0.05)
    raise ValueError(f"object {name} of {bucket} changed during each of {attempts} reads")


async def load(js: JetStreamContext, bucket: str, name: str) -> LoadedSnapshot | None:
    """The stored snapshot, or None when there is none. A corrupt object raises ValueError."""
    started = time.perf_counter()
    raw = await read_object(js, bucket, name)
    if raw is None:
        return None
    data = raw
    try:
        index, seq, state = decode_snapshot(data)
    except Exception as exc:  # noqa: BLE001 - any undecodable object is a corrupt snapshot, not a crash
        raise ValueError(f"corrupt snapshot {name}: {type(exc).__name__}: {exc}") from None
    admission = state.get("admission")
    return LoadedSnapshot(
        index, seq, len(data), time.perf_counter() - started, float(state.get("written_at", 0.0)),
        admission if isinstance(admission, dict) else None,
    )


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
