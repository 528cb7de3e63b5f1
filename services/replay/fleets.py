"""Fresh simulated fleets for each replay run: in this process, or as a `kvr mock-workers` child.

Each start uses new worker ids (a clock-derived base), and each stop deletes the workers' discovery
keys, so the scheduler and indexer drop the previous run's workers and their cached blocks; the
runner then waits until the scheduler's live set is exactly the new ids.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from nats.aio.client import Client as NATS

from schemas.subjects import Names
from services.mock_worker.app import FleetConfig, MockFleet, clock_worker_id_base
from services.runtime.procs import ServiceProcess

_last_base = 0


def fresh_base() -> int:
    """Strictly increasing id bases, even for two fleets started within the same clock tick."""
    global _last_base
    base = max(clock_worker_id_base(), _last_base + 1000)
    _last_base = base
    return base


def fleet_stats(workers: list[dict]) -> dict:
    """The fleet's own accounting, summed (and worst lag) over its workers."""
    out: dict = {"workers": len(workers)}
    for key in ("requests", "finished", "prompt_tokens", "cached_tokens", "preemptions", "evictions", "late_passes"):
        out[key] = sum(int(w.get(key, 0)) for w in workers)
    out["lag_max_ms"] = max((float(w.get("lag_max_ms", 0.0)) for w in workers), default=0.0)
    out["lag_total_ms"] = round(sum(float(w.get("lag_total_ms", 0.0)) for w in workers), 1)
    return out


class InProcessFleet:
    def __init__(self, nc: NATS, names: Names, cfg: FleetConfig) -> None:
        self.nc, self.names, self.cfg = nc, names, cfg
        self.fleet: MockFleet | None = None

    async def start(self) -> list[int]:
        self.fleet = MockFleet(self.nc, self.names, replace(self.cfg, worker_id_base=fresh_base()))
        await self.fleet.start()
        return self.fleet.worker_ids

    async def stats(self) -> dict:
        return fleet_stats([w.status() for w in self.fleet.workers]) if self.fleet else {}

    async def stop(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None


class SpawnedFleet:
    """`kvr mock-workers` as a child process (its own core: the simulation does not slow the client)."""

    # Children still running, so a caller interrupted mid-run (Ctrl-C in `kvr dev`) can stop them.
    live: dict[int, ServiceProcess] = {}

    def __init__(
        self, nats_url: str, cfg: FleetConfig, log_path: str | None = None, subject_prefix: str = "kvr"
    ) -> None:
        self.nats_url, self.cfg, self.log_path, self.subject_prefix = nats_url, cfg, log_path, subject_prefix
        self.proc: ServiceProcess | None = None

    def args(self, base: int) -> list[str]:
        e = self.cfg.engine
        return [
            "--subject-prefix", self.subject_prefix,
            "--count", str(self.cfg.count),
            "--worker-id-base", str(base),
            "--block-size", str(e.block_size),
            "--kv-blocks", str(e.kv_blocks),
            "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--max-num-seqs", str(e.max_num_seqs),
            "--watermark", str(e.watermark),
            "--speedup", str(self.cfg.speedup),
            "--model", self.cfg.model,
            "--worker-ttl-s", str(self.cfg.ttl_s),
            "--load-interval-s", str(self.cfg.load_interval_s),
            "--fused-decode-steps", str(self.cfg.fused_decode_steps),
            "--openai-port", str(self.cfg.openai_port),  # replays use the NATS generate endpoint
        ]

    async def start(self) -> list[int]:
        base = fresh_base()
        self.proc = ServiceProcess(
            "mock-workers", self.args(base), nats_url=self.nats_url, pools=[self.cfg.pool], log_path=self.log_path
        )
        self.proc.start()
        SpawnedFleet.live[id(self.proc)] = self.proc
        await asyncio.to_thread(self.proc.wait_ready, 60.0)
        return [base + i for i in range(self.cfg.count)]

    async def stats(self) -> dict:
        if self.proc is None:
            return {}
        status = await asyncio.to_thread(self.proc.readyz)
        return fleet_stats(status.get("workers", []))

    async def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            await asyncio.to_thread(proc.terminate)
            SpawnedFleet.live.pop(id(proc), None)

    @classmethod
    def terminate_all(cls) -> None:
        for key, proc in list(cls.live.items()):
            proc.terminate()
            cls.live.pop(key, None)
