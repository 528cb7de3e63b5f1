"""Builders shared by the scheduler tests."""

from __future__ import annotations

from schemas.bookings import BookingAdd
from schemas.discovery import WorkerRecord
from services.scheduler.candidates import Candidate, candidates_from


def record(wid: int, pool: str = "p", **kw) -> WorkerRecord:
    kw.setdefault("address", f"10.0.0.{wid}")
    kw.setdefault("port", 8000)
    kw.setdefault("pod_name", f"pod-{wid}")
    return WorkerRecord(worker_id=wid, pool=pool, **kw)


def cands(*records: WorkerRecord) -> list[Candidate]:
    return candidates_from(records)


def add(rid: str, wid: int, hashes: list[int], *, isl: int | None = None, overlap: int = 0, rank: int = 0, leg: str = "",
        track: bool = True, ts: int = 1_000, pool: str = "p", bs: int = 16, bid: str = "") -> BookingAdd:
    return BookingAdd(
        request_id=rid, router_id="r", pool=pool, worker_id=wid, dp_rank=rank, ts_ms=ts,
        isl_tokens=len(hashes) * bs if isl is None else isl, overlap_blocks=overlap, sequence_hashes=hashes,
        leg=leg, track_prefill_tokens=track, block_size=bs, booking_id=bid,
    )
