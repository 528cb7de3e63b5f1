"""The discovery directory (pure): one liveness rule for every service."""

from __future__ import annotations

import pytest

from schemas.discovery import WorkerRecord
from services.runtime.workers import WorkerDirectory

pytestmark = pytest.mark.unit


def record(worker_id: int, heartbeat_ms: int, ttl_s: float = 10.0, pool: str = "p") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, pool=pool, model="m", heartbeat_ms=heartbeat_ms, ttl_s=ttl_s)


def test_a_record_is_live_until_its_own_ttl_from_its_heartbeat() -> None:
    d = WorkerDirectory()
    d.put(record(1, heartbeat_ms=1_000, ttl_s=10.0), revision=1, now=5_000)
    d.put(record(2, heartbeat_ms=1_000, ttl_s=2.0), revision=2, now=5_000)
    entry = d.workers[("p", 1)]
    assert entry.is_live(10_999) and not entry.is_live(11_000)  # ttl boundary: 1 s + 10 s
    assert [r.worker_id for r in d.live("p", now=2_999)] == [1, 2]
    assert [r.worker_id for r in d.live("p", now=3_000)] == [1]  # worker 2's ttl is 2 s
    assert [e.record.worker_id for e in d.expired(3_000)] == [2]
    assert [r.worker_id for r in d.live("p")] == [1, 2]  # without a clock: every record the bucket holds


def test_a_record_without_heartbeat_ages_from_when_it_was_seen() -> None:
    d = WorkerDirectory()
    d.put(record(7, heartbeat_ms=0, ttl_s=1.0), revision=1, now=50_000)
    assert d.workers[("p", 7)].is_live(50_999)
    assert not d.workers[("p", 7)].is_live(51_000)
    assert [e.record.worker_id for e in d.expired(51_000)] == [7]


def test_live_is_per_pool_and_sorted_by_worker_id() -> None:
    d = WorkerDirectory()
    for wid in (5, 2, 9):
        d.put(record(wid, heartbeat_ms=100), revision=wid, now=100)
    d.put(record(3, heartbeat_ms=100, pool="q"), revision=3, now=100)
    assert [r.worker_id for r in d.live("p", now=200)] == [2, 5, 9]
    assert [r.worker_id for r in d.live("q", now=200)] == [3]
    assert d.delete("p", 5) is not None and d.delete("p", 5) is None
    assert [r.worker_id for r in d.live("p", now=200)] == [2, 9]
