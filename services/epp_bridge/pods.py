"""Map the gateway's candidate pods onto discovered workers (docs/protocol.md §5, Dynamo's pods filter).

A pod matches a worker by name (`WorkerRecord.pod_name`; GAIE's data-parallel "virtual pods"
`<pod>-rank-N` match their base pod) or else by `address:port` of any of the worker's ranks.
The pods filter restricts discovery, it never adds workers: a pod no record describes is ignored.
The ext_proc subset hint names `ip:port` endpoints, which map to (worker, dp_rank) targets: the
endpoint of each rank of a worker (one port per rank with `dp_ports`, else every rank shares one).
The pool's label filter (labels.py) removes workers before either restriction applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from schemas.api import EppPod
from schemas.discovery import WorkerRecord

from .labels import LabelFilter, passes_all

_RANK_SUFFIX = re.compile(r"^(?P<base>.+)-rank-(?P<rank>\d+)$")


class PodIndex:
    """Name → worker ids and endpoint → worker ids for one pool's known workers."""

    def __init__(self, records: Iterable[WorkerRecord], filters: Sequence[LabelFilter] = ()) -> None:
        self.by_name: dict[str, set[int]] = {}
        self.by_endpoint: dict[str, set[int]] = {}
        self.targets_by_endpoint: dict[str, set[tuple[int, int]]] = {}
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

    def match(self, pod: EppPod) -> set[int]:
        name = pod.pod_name
        if name:
            ids = self.by_name.get(name)
            if ids:
                return ids
            m = _RANK_SUFFIX.match(name)
            if m and m.group("base") in self.by_name:
                return self.by_name[m.group("base")]
        endpoint = pod.endpoint
        if endpoint:
            return self.by_endpoint.get(endpoint, set())
        return set()

    def allowed(self, pods: Sequence[EppPod] | None) -> list[int] | None:
        """Worker ids the pods and the label filter allow, sorted; None when neither restricts
        (no label filter, and missing or empty pods)."""
        if not pods:
            return sorted(self.eligible) if self.eligible is not None else None
        allowed: set[int] = set()
        for pod in pods:
            allowed |= self.match(pod)
        return sorted(allowed)

    def targets(self, endpoints: Iterable[str]) -> list[tuple[int, int]]:
        """(worker_id, dp_rank) targets these `ip:port` endpoints denote, sorted; unknown ones are ignored."""
        out: set[tuple[int, int]] = set()
        for endpoint in endpoints:
            out |= self.targets_by_endpoint.get(endpoint, set())
        return sorted(out)

    def required_taints_met(self, worker_ids: Iterable[int], required: Sequence[str]) -> bool:
        """Whether any of these known workers carries every required taint."""
        need = set(required)
        return any(need <= set(self.records[w].taints) for w in worker_ids if w in self.records)
