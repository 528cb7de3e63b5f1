"""Routing candidates: one per (worker, dp_rank) of every live discovery record (docs/protocol.md §3)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.discovery import WorkerRecord


@dataclass(frozen=True)
class Candidate:
    worker_id: int
    dp_rank: int
    role: str
    taints: frozenset[str]
    block_size: int
    total_kv_blocks: int | None
    max_num_batched_tokens: int | None
    pod_name: str | None
    endpoint: str | None
    target: tuple[int, int] = (0, 0)  # (worker_id, dp_rank), filled in by `candidates_of`


def candidates_of(record: WorkerRecord) -> list[Candidate]:
    taints = frozenset(record.taints)
    return [
        Candidate(
            worker_id=record.worker_id,
            dp_rank=rank,
            role=record.role,
            taints=taints,
            block_size=record.block_size,
            total_kv_blocks=record.total_kv_blocks,
            max_num_batched_tokens=record.max_num_batched_tokens,
            pod_name=record.pod_name,
            endpoint=record.endpoint(rank),
            target=(record.worker_id, rank),
        )
        for rank in record.dp_ranks
    ]


def candidates_from(records: Iterable[WorkerRecord]) -> list[Candidate]:
    out: list[Candidate] = []
    for record in records:
        out.extend(candidates_of(record))
    out.sort(key=lambda c: c.target)
    return out
