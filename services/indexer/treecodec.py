"""The prefix index ↔ events and snapshots (pure): the canonical dump and the snapshot codec.

- `dump(index)`: single-block stored events, breadth first, that rebuild the tree in an empty index
  (what `indexer.dump` returns; canonical, so replicas can be compared event for event).
- `snapshot_steps(index)` / `to_snapshot(index)` / `from_snapshot(state)`: compact builtins
  (msgpack-friendly): nodes as parallel arrays, entries as flat pairs, the event-id cursors;
  `encode_snapshot` / `decode_snapshot` add the stream sequence the snapshot covers
  (`snapshot.py` stores them in the object store).

These read the tree's internals (`index.py`), which keeps only the tree, its events and its queries.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from schemas.events import RouterEvent, StorageTier, removed_event, stored_event

from .index import DEVICE, TIERS, PrefixIndex, WorkerKey, _Node, _Worker

SNAPSHOT_VERSION = 1


def _bfs(index: PrefixIndex, canonical: bool = True) -> list[_Node]:
    """Nodes in breadth-first order; `canonical` sorts children by local hash so the order does
    not depend on insertion order (dumps); snapshots skip the sort."""
    order: list[_Node] = []
    frontier = [index.root]
    while frontier:
        nxt: list[_Node] = []
        for node in frontier:
            ch = node.children
            if ch:
                if canonical:
                    for k in sorted(ch):
                        nxt.append(ch[k])
                else:
                    nxt.extend(ch.values())
        order.extend(nxt)
        frontier = nxt
    return order


def _entries_by_node(index: PrefixIndex) -> dict[int, list[tuple[WorkerKey, StorageTier, int]]]:
    by_node: dict[int, list[tuple[WorkerKey, StorageTier, int]]] = {}
    for key, w in index._workers.items():
        for tier, lk in w.blocks.items():
            for e, node in lk.items():
                by_node.setdefault(id(node), []).append((key, tier, e))
    for entries in by_node.values():
        entries.sort(key=lambda x: (x[0], TIERS.index(x[1]), x[2]))
    return by_node


def dump(index: PrefixIndex) -> list[RouterEvent]:
    """Single-block stored events, breadth first, that rebuild this tree in an empty index.

    A worker that holds a block but none of its ancestor's (evicted middle block) cannot be
    expressed with stores alone: the dump stores the missing ancestors under synthetic engine
    hashes the worker does not use and removes them right after, which leaves exactly the
    original memberships. Event ids are synthetic, consecutive from 0 per (worker, dp_rank).
    """
    by_node = _entries_by_node(index)
    held: dict[tuple[int, WorkerKey], list[tuple[StorageTier, int]]] = {}
    for node_id, entries in by_node.items():
        for key, tier, e in entries:
            held.setdefault((node_id, key), []).append((tier, e))
    next_id: dict[WorkerKey, int] = {}
    out: list[RouterEvent] = []

    def eid(key: WorkerKey) -> int:
        n = next_id.get(key, 0)
        next_id[key] = n + 1
        return n

    synthetic_next: dict[WorkerKey, int] = {}

    def synthetic(w: _Worker) -> int:
        h = synthetic_next.get(w.key, (1 << 64) - 1)
        while w.resolve(h, DEVICE) is not None or any(h in lk for lk in w.blocks.values()):
            h -= 1
        synthetic_next[w.key] = h - 1
        return h

    for node in _bfs(index):
        for key, tier, e in by_node.get(id(node), ()):
            w = index._workers[key]
            parent = node.parent
            if parent is index.root:
                out.append(stored_event(key[0], eid(key), [(e, node.key)], None, key[1], tier))
                continue
            ref = _parent_ref(w, parent, tier, held)  # type: ignore[arg-type]
            if ref is not None:
                out.append(stored_event(key[0], eid(key), [(e, node.key)], ref, key[1], tier))
                continue
            # orphan: rebuild the missing ancestors under synthetic hashes, then drop them
            chain: list[_Node] = []
            anc = parent
            ref = None
            while anc is not index.root:
                ref = _parent_ref(w, anc, tier, held)  # type: ignore[arg-type]
                if ref is not None:
                    break
                chain.append(anc)  # type: ignore[arg-type]
                anc = anc.parent  # type: ignore[union-attr]
            chain.reverse()
            fakes: list[int] = []
            for a in chain:
                s = synthetic(w)
                out.append(stored_event(key[0], eid(key), [(s, a.key)], ref, key[1], tier))
                fakes.append(s)
                ref = s
            out.append(stored_event(key[0], eid(key), [(e, node.key)], ref, key[1], tier))
            out.append(removed_event(key[0], eid(key), fakes, key[1], tier))
    return out


def _parent_ref(
    w: _Worker, parent: _Node, tier: StorageTier, held: dict[tuple[int, WorkerKey], list[tuple[StorageTier, int]]]
) -> int | None:
    """An engine hash of `w` that resolves to `parent` when looked up from `tier`."""
    cands = held.get((id(parent), w.key), ())
    if len(cands) == 1 and cands[0][0] == tier:  # the common case: one entry, same tier
        return cands[0][1]
    order = [tier, *[t for t in TIERS if t != tier]]
    for t in order:
        for ct, e in cands:
            if ct == t and w.resolve(e, tier) is parent:
                return e
    return None


def to_snapshot(index: PrefixIndex) -> dict[str, Any]:
    """Compact builtins (msgpack-friendly): nodes as parallel arrays, entries as flat pairs."""
    steps = snapshot_steps(index)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def snapshot_steps(index: PrefixIndex, step: int = 10_000) -> Generator[None, None, dict[str, Any]]:
    """`to_snapshot` in pieces: yields after about `step` nodes or entries, returns the state.

    A caller that yields to its event loop between pieces keeps answering matches while a large
    index is serialised (≈ 0.75 s per million entries in one piece); it must not apply events
    until the generator is done, or the arrays would describe no single instant."""
    order: list[_Node] = list(index.root.children.values()) if index.root.children else []
    i = 0
    while i < len(order):  # breadth-first: `order` is its own FIFO queue
        end = min(i + step, len(order))
        for node in order[i:end]:
            ch = node.children
            if ch:
                order.extend(ch.values())
        i = end
        yield
    position = {id(index.root): 0}
    parents: list[int] = []
    keys: list[int] = []
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        position.update((id(n), start + i + 1) for i, n in enumerate(chunk))  # 0 = root
        parents.extend([position[id(n.parent)] for n in chunk])  # BFS: a parent precedes its children
        keys.extend([n.key for n in chunk])
        yield
    workers = []
    for key in sorted(index._workers):
        w = index._workers[key]
        for tier in TIERS:
            lk = w.blocks.get(tier)
            if not lk:
                continue
            flat: list[int] = []
            for e, node in lk.items():
                flat.append(position[id(node)])
                flat.append(e)
            workers.append([key[0], key[1], tier, flat])
            if len(lk) >= step:
                yield
    cursors = [[k[0], k[1], v] for k, v in sorted(index.cursors.items())]
    # publisher epochs (docs/protocol.md §2); absent in snapshots written before them = all 0
    epochs = [[k[0], k[1], v] for k, v in sorted(index.epochs.items())]
    return {"v": SNAPSHOT_VERSION, "parents": parents, "keys": keys, "workers": workers, "cursors": cursors, "epochs": epochs}


def from_snapshot(state: dict[str, Any]) -> PrefixIndex:
    if state.get("v") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {state.get('v')!r}")
    idx = PrefixIndex()
    nodes: list[_Node] = [idx.root]
    append = nodes.append
    for p, k in zip(state["parents"], state["keys"], strict=True):
        parent = nodes[p]
        node = _Node(parent, k)
        ch = parent.children
        if ch is None:
            parent.children = {k: node}
        else:
            ch[k] = node
        append(node)
    idx.nodes = len(nodes) - 1
    for wid, dp, tier, flat in state["workers"]:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r} in snapshot")
        w = idx._worker((wid, dp))
        lk = w.blocks.setdefault(tier, {})
        bit = w.bit
        device = tier == DEVICE
        for i, e in zip(flat[0::2], flat[1::2], strict=True):
            node = nodes[i]
            lk[e] = node
            if device:
                m = node.mask
                if m & bit:
                    idx._add_alias(node, tier, w.slot)
                else:
                    node.mask = m | bit
            else:
                idx._link_lower(node, tier, w)
                idx.lower_tier_blocks += 1
    idx.cursors = {(a, b): c for a, b, c in state["cursors"]}
    idx.epochs = {(a, b): c for a, b, c in state.get("epochs", ())}
    idx.version += 1
    return idx


def encode_snapshot(index: PrefixIndex, stream_seq: int, extra: dict[str, Any] | None = None) -> bytes:
    return encode_state(to_snapshot(index), stream_seq, extra)


def encode_state(state: dict[str, Any], stream_seq: int, extra: dict[str, Any] | None = None) -> bytes:
    """A `to_snapshot()` / `snapshot_steps()` state plus the stream sequence it covers, as msgpack."""
    state["stream_seq"] = stream_seq
    if extra:
        state.update(extra)
    return msgspec.msgpack.encode(state)


def decode_snapshot(data: bytes) -> tuple[PrefixIndex, int, dict[str, Any]]:
    state = msgspec.msgpack.decode(data)
    if not isinstance(state, dict) or "stream_seq" not in state:
        raise ValueError("not an index snapshot")
    return from_snapshot(state), int(state["stream_seq"]), state
