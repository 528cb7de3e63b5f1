"""Brute-force reference model of the prefix index: per worker, engine hash → full path of local hashes."""

from __future__ import annotations

from schemas.events import RouterEvent
from services.indexer.index import TIERS

Key = tuple[int, int]


class ModelIndex:
    def __init__(self) -> None:
        self.workers: dict[Key, dict[str, dict[int, tuple[int, ...]]]] = {}
        self.cursors: dict[Key, int] = {}
        self.epochs: dict[Key, int] = {}

    def _resolve(self, key: Key, h: int, tier: str) -> tuple[int, ...] | None:
        tiers = self.workers.get(key, {})
        for t in [tier, *[t for t in TIERS if t != tier]]:
            if h in tiers.get(t, {}):
                return tiers[t][h]
        return None

    def apply(self, event: RouterEvent, epoch: int = 0) -> str:
        ev = event.event
        key = (event.worker_id, ev.dp_rank)
        last = self.cursors.get(key)
        if epoch != self.epochs.get(key, 0):  # a new publisher run: ids start over
            self.epochs[key] = epoch
            last = None
        if last is not None and ev.event_id <= last and not isinstance(ev.data, str):
            return "duplicate"  # (a cleared going back is a publisher without epochs starting over)
        gap = last is not None and ev.event_id > last + 1
        self.cursors[key] = ev.event_id
        if not event.worker_domain:
            return "other_domain"
        tier = event.storage_tier
        data = ev.data
        outcome = "ok"
        if isinstance(data, str):
            self.workers.pop(key, None)
        elif data.stored is not None:
            blocks = data.stored.blocks
            prev = data.stored.parent_hash
            hashes = [b.block_hash for b in blocks]
            if any(h == p for h, p in zip(hashes, [prev, *hashes[:-1]], strict=True)):
                outcome = "invalid_block"
            else:
                if prev is None:
                    path: tuple[int, ...] | None = ()
                else:
                    path = self._resolve(key, prev, tier)
                if path is None:
                    outcome = "parent_not_found"
                else:
                    lk = self.workers.setdefault(key, {}).setdefault(tier, {})
                    for b in blocks:
                        path = path + (b.tokens_hash,)
                        lk[b.block_hash] = path
        else:
            held = self.workers.get(key, {}).get(tier)
            for h in data.removed.block_hashes:
                if held is None or h not in held:
                    outcome = "block_not_found"
                else:
                    del held[h]
        if gap and outcome == "ok":
            outcome = "gap"
        return outcome

    def remove_worker(self, worker_id: int) -> None:
        for key in [k for k in self.workers if k[0] == worker_id]:
            del self.workers[key]
        for key in [k for k in self.cursors if k[0] == worker_id]:
            del self.cursors[key]
        for key in [k for k in self.epochs if k[0] == worker_id]:
            del self.epochs[key]

    def _depth(self, paths: set[tuple[int, ...]], hashes: list[int]) -> int:
        k = 0
        while k < len(hashes) and tuple(hashes[: k + 1]) in paths:
            k += 1
        return k

    def scores(self, hashes: list[int], tiers: tuple[str, ...] = ("device",)) -> dict[Key, int]:
        out = {}
        for key, by_tier in self.workers.items():
            paths = {p for t in tiers for p in by_tier.get(t, {}).values()}
            d = self._depth(paths, hashes)
            if d:
                out[key] = d
        return out

    def early_exit_scores(self, hashes: list[int]) -> dict[Key, int]:
        """Dynamo's `find_matches(early_exit=true)` (its concurrent radix tree, block by block):
        workers dropping out at depth d score d; once one worker is left at block i the walk stops
        and that worker scores i + 1."""
        paths = {key: set(by_tier.get("device", {}).values()) for key, by_tier in self.workers.items()}
        if not hashes:
            return {}
        active = {k for k, p in paths.items() if tuple(hashes[:1]) in p}
        if not active:
            return {}
        if len(active) == 1:
            return dict.fromkeys(active, 1)
        out: dict[Key, int] = {}
        depth = 1
        for i in range(1, len(hashes)):
            holders = {k for k, p in paths.items() if tuple(hashes[: i + 1]) in p}
            for k in active - holders:
                out[k] = depth
            active &= holders
            if not active:
                break
            depth = i + 1
            if len(active) == 1:
                break
        out.update(dict.fromkeys(active, depth))
        return out

    def tier_scores(self, hashes: list[int]) -> dict[str, dict[Key, int]]:
        result = {}
        covered = self.scores(hashes)
        for i in range(1, len(TIERS)):
            cum = self.scores(hashes, TIERS[: i + 1])
            beyond = {k: d - covered.get(k, 0) for k, d in cum.items() if d - covered.get(k, 0) > 0}
            if beyond:
                result[TIERS[i]] = beyond
            covered = cum
        return result

    def tree_sizes(self) -> dict[Key, int]:
        return {k: len(v.get("device", {})) for k, v in self.workers.items() if v.get("device")}
