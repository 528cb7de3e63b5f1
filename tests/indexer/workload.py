"""A deterministic synthetic KV-event workload: chains that extend what a worker holds, evictions, clears."""

from __future__ import annotations

import random

from schemas.events import RouterEvent, cleared_event, removed_event, stored_event


class Workload:
    def __init__(self, seed: int, workers: int = 4, dp_ranks: int = 2, vocab: int = 6) -> None:
        self.rng = random.Random(seed)
        self.keys = [(w, d) for w in range(1, workers + 1) for d in range(dp_ranks)]
        self.vocab = vocab
        self.next_id = {k: 0 for k in self.keys}
        self.held: dict[tuple[int, int], list[int]] = {k: [] for k in self.keys}
        self.counter = 0

    def _eid(self, key: tuple[int, int]) -> int:
        n = self.next_id[key]
        self.next_id[key] = n + 1
        return n

    def message(self, key: tuple[int, int] | None = None) -> list[RouterEvent]:
        """One message: 1-3 events of one (worker, dp_rank)."""
        key = key or self.rng.choice(self.keys)
        out = []
        for _ in range(self.rng.randint(1, 3)):
            r = self.rng.random()
            held = self.held[key]
            if r < 0.6 or not held:
                parent = self.rng.choice(held) if held and self.rng.random() < 0.6 else None
                blocks = []
                for _ in range(self.rng.randint(1, 5)):
                    self.counter += 1
                    blocks.append((key[0] * 10**9 + self.counter, self.rng.randint(1, self.vocab)))
                out.append(stored_event(key[0], self._eid(key), blocks, parent, key[1]))
                held.extend(b for b, _ in blocks)
            elif r < 0.95:
                victims = self.rng.sample(held, min(len(held), self.rng.randint(1, 3)))
                for v in victims:
                    held.remove(v)
                out.append(removed_event(key[0], self._eid(key), victims, key[1]))
            else:
                held.clear()
                out.append(cleared_event(key[0], self._eid(key), key[1]))
        return out

    def forget_worker(self, worker_id: int) -> None:
        for k in self.keys:
            if k[0] == worker_id:
                self.held[k] = []
