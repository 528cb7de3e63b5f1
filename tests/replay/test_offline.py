"""The offline discrete-event simulator: determinism, completeness, no leaked bookings, kv beats
round-robin on reuse, fused decode ≡ stepping, and the `kvr replay --offline` CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from schemas.api import Policy
from services.mock_worker.engine import EngineConfig
from services.replay.__main__ import main as replay_main
from services.replay.offline import OfflineConfig, OfflineSim, cost_with_overrides, run_offline
from services.replay.report import summarize
from services.replay.trace import TraceRequest, synthetic_trace, write_trace
from services.scheduler.cost import DYNAMO_COST, CostConfig
from services.scheduler.selector import BusyThresholds

ENGINE = EngineConfig(block_size=64, kv_blocks=1_024, max_num_batched_tokens=4_096, max_num_seqs=64)


@pytest.fixture(scope="module")
def workload():
    # 24 shared system prompts of 8 × 512 tokens (1,536 blocks of 64 in all: more than one worker
    # holds) + private tails, ~6 req/s over 4 workers.
    return synthetic_trace(160, groups=24, prefix_blocks=8, seed=3, rate_per_s=6.0)


def _cfg(policy: str, **kw) -> OfflineConfig:
    return OfflineConfig(policy=Policy(policy), workers=4, engine=ENGINE, max_output_tokens=48, **kw)


def _outcome(run) -> list[tuple]:
    # Times rounded to 1 ns: a fused span sums its pass durations in another order than stepping.
    return [(r.request_id, r.worker_id, r.overlap_blocks, r.cached_tokens, round(r.ttft_ms, 6), round(r.e2e_ms, 6),
             r.output_tokens) for r in run.records]


@pytest.mark.parametrize("policy", ["kv", "random"])
def test_same_seed_same_report(workload, policy) -> None:
    a = run_offline(workload, _cfg(policy, seed=5))
    b = run_offline(workload, _cfg(policy, seed=5))
    assert _outcome(a) == _outcome(b)
    sa, sb = summarize(a), summarize(b)
    for key in ("hit_rate", "ttft_ms", "e2e_ms", "uncached_tokens_per_worker", "requests_per_worker"):
        assert sa[key] == sb[key]


def test_random_policy_depends_on_seed(workload) -> None:
    a = run_offline(workload, _cfg("random", seed=1))
    b = run_offline(workload, _cfg("random", seed=2))
    assert [r.worker_id for r in a.records] != [r.worker_id for r in b.records]


@pytest.mark.parametrize("policy", ["kv", "round_robin", "random", "least_loaded"])
def test_every_request_completes_and_no_booking_is_left(workload, policy) -> None:
    sim = OfflineSim(_cfg(policy))
    run = sim.run(workload)
    s = summarize(run)
    assert s["requests"] == len(workload) and s["completed"] == len(workload) and s["errors"] == 0
    assert s["open_bookings"] == 0 and not sim.tracker.legs and not sim.tracker.ranks
    assert all(e.idle for e in sim.engines.values())
    # The report's hit rate is the engines' own accounting.
    assert s["fleet_hit_rate"] == pytest.approx(s["hit_rate"])
    for r in run.records:
        assert 0 < r.ttft_ms <= r.e2e_ms
        assert r.output_tokens == r.max_tokens
    assert sum(int(v) for v in s["requests_per_worker"].values()) == len(workload)


def test_kv_reuses_more_than_round_robin(workload) -> None:
    kv = summarize(run_offline(workload, _cfg("kv")))
    rr = summarize(run_offline(workload, _cfg("round_robin")))
    rnd = summarize(run_offline(workload, _cfg("random")))
    assert kv["hit_rate"] > rr["hit_rate"] + 0.05
    assert kv["hit_rate"] > rnd["hit_rate"] + 0.05


def test_fused_decode_equals_stepping(workload) -> None:
    # round_robin does not read the index, so the (batched) event visibility cannot change routing:
    # fusing pure-decode passes must give exactly the stepped outcome.
    fused = run_offline(workload, _cfg("round_robin", fused_decode_steps=256))
    stepped = run_offline(workload, _cfg("round_robin", fused_decode_steps=1))
    assert fused.fleet["fused_commits"] > 0 and stepped.fleet["fused_commits"] == 0
    assert _outcome(fused) == _outcome(stepped)


def test_rate_scale_compresses_arrivals(workload) -> None:
    run = run_offline(workload, _cfg("round_robin", rate_scale=4.0))
    t0 = workload[0].timestamp_ms
    assert [r.arrival_ms for r in run.records] == [(w.timestamp_ms - t0) / 4.0 for w in workload]


def test_cost_overrides() -> None:
    assert cost_with_overrides([]) == CostConfig()
    # the weights are the scheduler's flags (tests/replay/test_routing_settings.py), not overrides
    for bad in (["bogus=1"], ["decode_load_scale"], ["credit_load_gain=x"], ["overlap_score_credit=2"], ["temperature=0.5"]):
        with pytest.raises(ValueError):
            cost_with_overrides(bad)
    with pytest.raises(ValueError):
        OfflineConfig(rate_scale=0)
    assert cost_with_overrides(["rule=dynamo"]) == DYNAMO_COST
    assert cost_with_overrides(["rule=dynamo", "decode_load_scale=0.5", "clip_prefill=0"]) == replace(
        DYNAMO_COST, decode_load_scale=0.5, clip_prefill=False
    )
    assert cost_with_overrides(["credit_load_gain=2"]) == replace(CostConfig(), credit_load_gain=2.0)
    for bad in (["rule=sglang"], ["credit_load_gain=-1"], ["decode_load_scale=inf"]):
        with pytest.raises(ValueError):
            cost_with_overrides(bad)


PEERS = ["sglang_cache_aware", "gaie_default", "llmd_precise"]


@pytest.mark.parametrize("peer", PEERS)
def test_peer_runs_complete_deterministically_through_the_same_pipeline(workload, peer) -> None:
    a = run_offline(workload, _cfg("kv", peer=peer))
    b = run_offline(workload, _cfg("kv", peer=peer))
    assert _outcome(a) == _outcome(b)
    assert a.policy == peer and not a.open_bookings
    s = summarize(a)
    assert s["completed"] == len(workload) and s["errors"] == 0
    assert s["hit_rate"] == pytest.approx(s["fleet_hit_rate"])
    assert s["hit_rate"] > summarize(run_offline(workload, _cfg("round_robin")))["hit_rate"]  # they do use the cache


def test_dynamo_busy_threshold_runs_through_the_selector(workload) -> None:
    # A threshold every worker exceeds as soon as it runs anything: requests are refused (overloaded)
    # instead of queued, as Dynamo answers 529; the others complete.
    tight = _cfg("kv", busy=BusyThresholds(active_decode_blocks=0.001), label="dynamo_busy")
    s = summarize(run_offline(workload, tight))
    assert s["policy"] == "dynamo_busy"
    assert s["errors"] > 0 and set(s["error_kinds"]) == {"select:overloaded"}
    assert s["completed"] + s["errors"] == len(workload)


def test_gateway_metrics_are_scraped_on_their_interval(workload) -> None:
    sim = OfflineSim(_cfg("kv", peer="gaie_default", metrics_interval_ms=50.0))
    sim._now = 0.0
    first = sim._metrics()
    sim.engines[1].submit("x", [1] * 100, 4, 0.0)
    sim._now = 49.0
    assert sim._metrics() is first  # not scraped again yet: the new request is not seen
    sim._now = 50.0
    assert sim._metrics()[(1, 0)].waiting == 1


def test_cli_offline_writes_report(tmp_path: Path) -> None:
    trace = write_trace(synthetic_trace(60, groups=4, prefix_blocks=4, seed=1), tmp_path / "t.jsonl")
    out = tmp_path / "out"
    rc = replay_main([str(trace), "--offline", "true", "--compare", "kv,round_robin", "--rate-scale", "1,2", "--workers", "2",
                      "--kv-blocks", "2048", "--max-output-tokens", "16", "--out", str(out), "--progress", "false"])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["meta"]["mode"].startswith("offline")
    assert [(r["policy"], r["rate_scale"]) for r in doc["runs"]] == [("kv", 1.0), ("round_robin", 1.0), ("kv", 2.0), ("round_robin", 2.0)]
    assert all(r["completed"] == 60 and r["open_bookings"] == 0 for r in doc["runs"])
    assert (out / "ttft_cdf.png").exists() and (out / "load.png").exists()
    with pytest.raises(SystemExit) as exc:
        replay_main([str(trace), "--offline", "true", "--offline-overrides", "nope=1", "--out", str(out)])
    assert exc.value.code == 2


@pytest.mark.parametrize(("cleanup", "booking"), [(500.0, 800.0), (0.0, 120.0), (300.0, 0.0)])
def test_stale_load_view_still_drains(workload, cleanup, booking) -> None:
    # With booking events delayed (a stale load view), every booking still ends and nothing leaks.
    sim = OfflineSim(_cfg("kv", cleanup_delay_ms=cleanup, booking_delay_ms=booking, event_delay_ms=1_000.0))
    s = summarize(sim.run(workload))
    assert s["completed"] == len(workload) and s["open_bookings"] == 0 and not sim.tracker.ranks


def test_burst_herds_only_when_decisions_do_not_see_each_other() -> None:
    # 8 unrelated requests at the same instant on 4 idle workers: with each booking applied before
    # the next decision (the scheduler's semantics) kv spreads them; when decisions within 50 ms do
    # not see each other's bookings (online concurrent selects) they all pick the same worker.
    burst = [TraceRequest(i, 0, 2_000, 8, (1_000 + 10 * i, 1_001 + 10 * i, 1_002 + 10 * i, 1_003 + 10 * i)) for i in range(8)]
    fresh = run_offline(burst, _cfg("kv"))
    stale = run_offline(burst, _cfg("kv", booking_delay_ms=50.0))
    assert sorted({r.worker_id for r in fresh.records}) == [1, 2, 3, 4]
    assert {r.worker_id for r in stale.records} == {1}
    assert summarize(stale)["ttft_ms"]["mean"] > summarize(fresh)["ttft_ms"]["mean"]


def test_busy_workers_queue_in_the_simulator_as_in_the_service() -> None:
    """The service's admission queue (Dynamo's scheduling queue) in simulated time: with Dynamo's
    0.9 busy threshold, a burst larger than the worker's KV waits for freed slots instead of
    failing; with the queue off, or a deadline shorter than a request, the overflow is `overloaded`."""
    from services.scheduler.selector import BusyThresholds

    small = EngineConfig(block_size=64, kv_blocks=80, max_num_batched_tokens=4_096, max_num_seqs=64)
    burst = [TraceRequest(i, 0, 2_000, 8, tuple(range(100 * i, 100 * i + 32))) for i in range(8)]
    busy = BusyThresholds(active_decode_blocks=0.9)

    def run(**kw):
        return run_offline(burst, OfflineConfig(policy="kv", workers=1, engine=small, max_output_tokens=8, busy=busy, **kw))

    queued = run(queue_timeout_ms=600_000.0)
    assert [r.error for r in queued.records] == [None] * 8 and not queued.open_bookings
    # Three fit at once (0, 32 and 64 of 80 blocks are ≤ 0.9); the rest started only after frees.
    ttft = sorted(r.ttft_ms for r in queued.records)
    refused = run(queue_max_size=0)
    assert sum(r.error == "select:overloaded" for r in refused.records) == 5
    assert ttft[-1] > max(r.ttft_ms for r in refused.records if r.error is None)
    short = run(queue_timeout_ms=1.0)
    assert sum(r.error == "select:overloaded" for r in short.records) == 5 and not short.open_bookings
    # The service's defaults are the simulator's: the 0.9 threshold and a 256 × 500 ms queue.
    default = run_offline(burst, OfflineConfig(policy=Policy.KV, workers=1, engine=small, max_output_tokens=8))
    assert [r.error for r in default.records] == [r.error for r in run(queue_timeout_ms=500.0).records]
    # Without thresholds nothing is ever busy: the queue stays empty.
    off = OfflineConfig(policy=Policy.KV, workers=1, engine=small, max_output_tokens=8, busy=BusyThresholds())
    assert all(r.error is None for r in run_offline(burst, off).records)


def test_busy_flags_queue_and_refuse_through_the_cli(tmp_path: Path) -> None:
    """The same burst through `kvr replay --offline` with the scheduler's flags: what
    `--active-decode-blocks-threshold`, `--queue-max-size` and `--queue-timeout-s` do to the service's
    selects (wait for a freed slot, or `overloaded`) they do here, and the default is the service's."""
    burst = [TraceRequest(i, 0, 2_000, 8, tuple(range(100 * i, 100 * i + 32))) for i in range(8)]
    trace = write_trace(burst, tmp_path / "burst.jsonl")
    fleet = ["--workers", "1", "--block-size", "64", "--kv-blocks", "80", "--max-num-batched-tokens", "4096",
             "--max-num-seqs", "64", "--max-output-tokens", "8", "--progress", "false"]

    def run(name: str, *flags: str) -> tuple[int, list[str | None]]:
        out = tmp_path / name
        rc = replay_main([str(trace), "--offline", "true", *fleet, "--out", str(out), *flags])
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        return rc, [r["error"] for r in records]

    # All eight wait for freed slots (three fit at once: 0, 32, 64 of 80 blocks are <= 0.9).
    assert run("queued", "--active-decode-blocks-threshold", "0.9", "--queue-timeout-s", "600") == (0, [None] * 8)
    rc, errors = run("refused", "--active-decode-blocks-threshold", "0.9", "--queue-max-size", "0")
    assert rc == 1 and errors.count("select:overloaded") == 5 and errors[:3] == [None] * 3
    rc, errors = run("deadline", "--queue-timeout-s", "0.001")  # the default threshold: 0.9
    assert rc == 1 and errors.count("select:overloaded") == 5
    assert run("off", "--active-decode-blocks-threshold", "off", "--queue-max-size", "0") == (0, [None] * 8)
