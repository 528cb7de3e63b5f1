"""Map the gateway's candidate pods onto discovered (worker, dp rank) targets (docs/protocol.md §5,
Dynamo's pods filter).

The gateway offers endpoints; each is one or more (worker, dp rank) targets, and the candidates are
exactly those targets (never every rank of a worker whose one rank was offered). A pod matches:
1. by its `address:port`, the targets whose endpoint that is (one port per rank with `dp_ports`,
   else every rank of the worker shares one);
2. else by name: GAIE's data-parallel virtual pod `<pod>-rank-N` is the N-th rank (from 0) of the
   worker of pod `<pod>` (nothing when it has fewer), any other name every rank of the worker of
   that `pod_name`.
The pods filter restricts discovery, it never adds workers: a pod no record describes is ignored.
Each target remembers the endpoint the gateway offered for it (`Offer.endpoints`), and the routing
headers name that endpoint, so the destination is always one the gateway offered. The ext_proc
subset hint names `ip:port` endpoints the same way. The pool's label filter (labels.py) removes
workers before either restriction applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from schemas.api import EppPod
from schemas.discovery import WorkerRecord

from .labels import LabelFilter, passes_all

_RANK_SUFFIX = re.compile(r"^(?P<base>.+)-rank-(?P<rank>\d+)$")
Target = tuple[int, int]


class Offer(NamedTuple):
    """What the gateway's candidates allow: targets (None = no restriction) and, per target, the
    endpoint the gateway offered for it (absent when it named the pod without an address)."""

    targets: list[Target] | None
    endpoints: Mapping[Target, str]


class PodIndex:
    """Name → worker ids and endpoint → worker ids for one pool's known workers."""

    def __init__(self, records: Iterable[WorkerRecord], filters: Sequence[LabelFilter] = ()) -> None:
        self.by_name: dict[str, set[int]] = {}
        self.by_endpoint: dict[str, set[int]] = {}
        self.targets_by_endpoint: dict[str, set[Target]] = {}
        self.records: dict[int, WorkerRecord] = {}
        # Worker ids the label filter lets through; None = the pool has no label filter.
        self.eligible: set[int] | None = set() if filters else None
        sizes: set[int] = set()
        for rec in records:
            if filters:
                if not passes_all(filters, rec.labels):
                    continue
                self.eligible.add(rec.worker_id)  # type: ignore[union-attr]
            self.records[rec.worker_id] = rec
            sizes.add(rec.block_size)
            if rec.pod_name:
                self.by_name.setdefault(rec.pod_name, set()).add(rec.worker_id)
            for rank in rec.dp_ranks:
                endpoint = rec.endpoint(rank)
                if endpoint:
                    self.by_endpoint.setdefault(endpoint, set()).add(rec.worker_id)
                    self.targets_by_endpoint.setdefault(endpoint, set()).add((rec.worker_id, rank))
        # The pool's block size when its workers agree on one; otherwise the scheduler hashes.
        self.block_size: int | None = sizes.pop() if len(sizes) == 1 else None

    def match(self, pod: EppPod) -> set[Target]:
        """The (worker, dp rank) targets one gateway pod denotes (module docstring)."""
        endpoint = pod.endpoint
        if endpoint:
            found = self.targets_by_endpoint.get(endpoint)
            if found:
                return found
        name = pod.pod_name
        if not name:
            return set()
        ids = self.by_name.get(name)
        if ids:
            return {(w, r) for w in ids for r in self.records[w].dp_ranks}
        m = _RANK_SUFFIX.match(name)
        if m and m.group("base") in self.by_name:
            # GAIE numbers a pod's data-parallel virtual pods from 0: the N-th rank of the worker.
            n = int(m.group("rank"))
            return {(w, self.records[w].dp_start_rank + n) for w in self.by_name[m.group("base")] if n < self.records[w].dp_size}
        return set()

    def offer(self, pods: Sequence[EppPod] | None, endpoints: Sequence[str] | None = None) -> Offer:
        """The targets the gateway offered (its pods, or the ext_proc subset hint's endpoints; both
        intersect) and the endpoint it offered for each. No pods and no hint: no restriction."""
        offered: dict[Target, str] = {}
        targets: set[Target] | None = None
        if pods:
            targets = set()
            for pod in pods:
                found = self.match(pod)
                targets |= found
                endpoint = pod.endpoint
                if endpoint:
                    for t in found:
                        # Prefer the offered endpoint that is the rank's own, if several name it.
                        if t not in offered or endpoint == self.records[t[0]].endpoint(t[1]):
                            offered[t] = endpoint
        if endpoints is not None:
            hinted = self.targets(endpoints)
            for endpoint in endpoints:
                for t in self.targets_by_endpoint.get(endpoint, ()):
                    offered.setdefault(t, endpoint)
            targets = set(hinted) if targets is None else targets & set(hinted)
        if targets is None:
            return Offer(None, {})
        return Offer(sorted(targets), {t: e for t, e in offered.items() if t in targets})

    def allowed(self, pods: Sequence[EppPod] | None) -> list[int] | None:
        """Worker ids the pods and the label filter allow, sorted; None when neither restricts
        (no label filter, and missing or empty pods)."""
        if not pods:
            return sorted(self.eligible) if self.eligible is not None else None
        return sorted({w for pod in pods for w, _ in self.match(pod)})

    def targets(self, endpoints: Iterable[str]) -> list[Target]:
        """(worker_id, dp_rank) targets these `ip:port` endpoints denote, sorted; unknown ones are ignored."""
        out: set[Target] = set()
        for endpoint in endpoints:
            out |= self.targets_by_endpoint.get(endpoint, set())
        return sorted(out)

    def required_taints_met(self, worker_ids: Iterable[int], required: Sequence[str]) -> bool:
        """Whether any of these known workers carries every required taint."""
        need = set(required)
        return any(need <= set(self.records[w].taints) for w in worker_ids if w in self.records)
