"""Worker discovery records in KV bucket KVR_WORKERS (docs/protocol.md §3) and optional load reports."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .types import MAX_TAINTS, DpRank, NonNegInt, Pool, WorkerId

Role = Literal["aggregated", "prefill", "decode"]
Port = Annotated[int, Meta(ge=0, le=65535)]
Taint = Annotated[str, Meta(min_length=1, max_length=253)]


class WorkerRecord(msgspec.Struct, omit_defaults=True):
    worker_id: WorkerId
    pool: Pool
    model: str = ""
    pod_name: str | None = None
    address: str | None = None
    port: Port | None = None
    dp_start_rank: DpRank = 0
    dp_size: Annotated[int, Meta(ge=1, le=1024)] = 1
    dp_ports: list[Port] | None = None
    role: Role = "aggregated"
    block_size: Annotated[int, Meta(ge=1, le=65536)] = 16
    total_kv_blocks: NonNegInt | None = None
    max_num_batched_tokens: NonNegInt | None = None
    max_num_seqs: NonNegInt | None = None
    taints: Annotated[list[Taint], Meta(max_length=MAX_TAINTS)] = []
    labels: dict[str, str] = {}
    heartbeat_ms: NonNegInt = 0
    ttl_s: Annotated[float, Meta(gt=0, le=86400)] = 15.0

    def __post_init__(self) -> None:
        if self.dp_ports is not None and len(self.dp_ports) != self.dp_size:
            raise ValueError(f"dp_ports has {len(self.dp_ports)} entries, dp_size is {self.dp_size}")

    @property
    def dp_ranks(self) -> range:
        return range(self.dp_start_rank, self.dp_start_rank + self.dp_size)

    def endpoint(self, dp_rank: int) -> str | None:
        """`address:port` of one rank (docs/protocol.md §3)."""
        if self.address is None:
            return None
        if self.dp_ports is not None:
            return f"{self.address}:{self.dp_ports[dp_rank - self.dp_start_rank]}"
        if self.port is None:
            return self.address
        return f"{self.address}:{self.port}"


def worker_key(pool: str, worker_id: int) -> str:
    return f"{pool}.{worker_id}"


class LoadReport(msgspec.Struct, omit_defaults=True):
    """Optional worker-reported load on core subject `kvr.{pool}.load.{worker_id}`."""

    worker_id: WorkerId
    dp_rank: DpRank = 0
    active_decode_blocks: NonNegInt | None = None
    active_prefill_tokens: NonNegInt | None = None
    kv_used_blocks: NonNegInt | None = None
    kv_total_blocks: NonNegInt | None = None
    num_requests_running: NonNegInt | None = None
    num_requests_waiting: NonNegInt | None = None
    ts_ms: NonNegInt = 0
