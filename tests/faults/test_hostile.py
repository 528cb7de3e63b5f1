"""The large-message backlog and the unregistered-worker flood against `kvr indexer` / `kvr scheduler`
processes: the short versions of bench/hostile_input.py's (and bench/faults.py's) runs, on the same
code. The in-process checks of the same rules are in tests/indexer/test_hostile.py and
tests/runtime/test_follower.py; the fuzzed inputs in tests/fuzz/."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.hostile_input import backlog, flood

pytestmark = pytest.mark.integration


async def test_a_backlog_of_large_messages_no_slow_consumer_ready_only_when_applied(tmp_path: Path) -> None:
    res = await backlog(24, 4096, tmp_path)  # 24 messages of 4,096 blocks (≈ 2.5 MB) waiting before the start
    print(res)
    assert res["seconds_to_ready"] is not None, res
    assert res["ready_before_all_applied"] is False and res["applied_seq_at_ready"] == res["last_seq"]
    assert res["slow_consumers"] == 0 and res["follower_resets"] == 0


async def test_a_flood_from_unregistered_workers_keeps_memory_flat(tmp_path: Path) -> None:
    res = await flood(200, 400_000, tmp_path)  # 400,000 blocks (≈ 15 MB) from 200 worker ids nobody registered
    print(res)
    unknown = res["indexer_unknown_workers"]
    assert unknown["held_bytes"] <= 8 << 20 and unknown["evicted"] > 0, res  # a bounded buffer, oldest out
    assert sum(res["indexer_blocks"].values()) == 0, res  # nothing of theirs indexed
    for name, growth in res["rss_growth_mb"].items():
        assert growth < 50, (name, res)  # the bound for 2M blocks; this is a tenth of that
