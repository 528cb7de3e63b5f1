"""A reference applier of KV-cache events (docs/protocol.md §2), per worker, rank and tier: what the
relay's output must rebuild, compared by the relay tests and bench/relay_faults.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import RouterEvent
from schemas.hashing import local_block_hashes, salt_seed


@dataclass
class RefIndex:
    """A minimal docs/protocol.md §2 applier (per worker, rank and tier) to compare index states."""

    blocks: dict[tuple[int, int, str], dict[int, tuple[int, int | None]]] = field(default_factory=dict)
    last_id: dict[tuple[int, int], int] = field(default_factory=dict)
    duplicates: int = 0
    skipped_stores: int = 0

    def apply(self, ev: RouterEvent) -> None:
        key = (ev.worker_id, ev.event.dp_rank)
        last = self.last_id.get(key)
        if last is not None and ev.event.event_id <= last:
            self.duplicates += 1
            return
        self.last_id[key] = ev.event.event_id
        data = ev.event.data
        if isinstance(data, str):
            for k in [k for k in self.blocks if k[:2] == key]:
                del self.blocks[k]
            return
        tree = self.blocks.setdefault((*key, ev.storage_tier), {})
        if data.stored is not None:
            parent = data.stored.parent_hash
            if parent is not None and parent not in tree:
                self.skipped_stores += 1
                return
            for b in data.stored.blocks:
                tree[b.block_hash] = (b.tokens_hash, parent)
                parent = b.block_hash
        elif data.removed is not None:
            for h in data.removed.block_hashes:
                tree.pop(h, None)

    def apply_all(self, events: list[RouterEvent]) -> RefIndex:
        for ev in events:
            self.apply(ev)
        return self

    def state(self) -> dict[tuple[int, int, str], set[tuple[int, int, int | None]]]:
        """Content without engine-independent noise: (tokens_hash, block, parent) per tree."""
        return {k: {(t, h, p) for h, (t, p) in tree.items()} for k, tree in self.blocks.items() if tree}

    def match(self, tokens: list[int], block_size: int = 16, lora: str | None = None, salt: str | None = None,
              tier: str = "device") -> dict[tuple[int, int], int]:
        """Leading request blocks held per (worker, rank), following the chain by tokens_hash."""
        want = local_block_hashes(tokens, block_size, salt_seed(lora, salt))
        out = {}
        for wid, rank in self.last_id:
            tree = self.blocks.get((wid, rank, tier), {})
            children: dict[tuple[int | None, int], int] = {(p, th): h for h, (th, p) in tree.items()}
            parent, n = None, 0
            for th in want:
                h = children.get((parent, th))
                if h is None:
                    break
                parent, n = h, n + 1
            out[(wid, rank)] = n
        return out
