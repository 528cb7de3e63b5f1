"""Trace loading and token expansion; report statistics, tables and plots (pure, no NATS)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from services.replay.report import LAG_WARN_MS, lag_warnings, markdown_table, percentile, summarize, write_report
from services.replay.runner import RequestRecord, RunResult
from services.replay.trace import (
    TRACE_BLOCK,
    TokenExpander,
    TraceError,
    TraceRequest,
    ideal_hit_rate,
    load_trace,
    open_trace,
    parse_line,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DATA = DATA_DIR / "mooncake_conversation_trace.jsonl.gz"


def test_same_hash_id_same_tokens_and_partial_last_block():
    exp = TokenExpander()
    a = TraceRequest(0, 0, 1200, 5, (0, 1, 2))
    b = TraceRequest(1, 0, 700, 5, (0, 1))
    c = TraceRequest(2, 0, 600, 5, (0, 9))
    ta, tb, tc = exp.tokens(a), exp.tokens(b), exp.tokens(c)
    assert len(ta) == 1200 and len(tb) == 700
    assert ta[:700] == tb  # same leading ids → identical tokens
    assert tc[:TRACE_BLOCK] == ta[:TRACE_BLOCK] and tc[TRACE_BLOCK:] != ta[TRACE_BLOCK:600]
    assert TokenExpander().tokens(a) == ta  # deterministic across instances
    assert TokenExpander(salt=1).tokens(a) != ta
    assert all(0 <= t < 32_000 for t in ta)


def test_parse_errors_are_clear(tmp_path):
    with pytest.raises(TraceError, match="line 3"):
        parse_line("{}", 2)
    with pytest.raises(TraceError, match="cannot cover"):
        parse_line('{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1]}', 0)
    with pytest.raises(TraceError, match="non-negative"):
        parse_line('{"timestamp": -1, "input_length": 20, "output_length": 1, "hash_ids": [1]}', 0)
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\nnot json\n')
    with pytest.raises(TraceError, match="line 2"):
        load_trace(bad)


def test_real_trace_slice_and_ideal_hit_rate():
    reqs = load_trace(DATA, start=10, limit=50)
    assert len(reqs) == 50 and reqs[0].index == 10
    assert all(r.hash_ids[0] == 0 for r in reqs)  # every conversation request starts with the same block
    # the whole conversation trace: 37.36 % of prompt tokens reusable (data/README.md)
    assert ideal_hit_rate(load_trace(DATA)) == pytest.approx(0.3736, abs=0.0005)


def test_gzip_and_plain_traces_read_the_same(tmp_path):
    lines = [
        '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}',
        "",
        '{"timestamp": 5, "input_length": 20, "output_length": 1, "hash_ids": [0]}',
    ]
    plain = tmp_path / "t.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "t.data"  # the gzip magic bytes decide, not the name
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_trace(packed) == load_trace(plain) == [TraceRequest(0, 0, 600, 3, (0, 1)), TraceRequest(2, 5, 20, 1, (0,))]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"timestamp": 0}\n'))
    with pytest.raises(TraceError, match="line 1"):
        load_trace(bad)


def _readme_checksums() -> dict[str, tuple[int, str]]:
    """file → (uncompressed bytes, SHA-256) from the table in data/README.md."""
    rows = re.findall(r"^\| `([^`]+\.jsonl\.gz)` \| [^|]+ \| ([\d,]+) \| `([0-9a-f]{64})` \|$",
                      (DATA_DIR / "README.md").read_text(), re.M)
    return {name: (int(size.replace(",", "")), digest) for name, size, digest in rows}


def test_shipped_traces_are_the_upstream_files():
    """The provenance notice names every shipped file, and each decompresses to the upstream bytes."""
    checksums = _readme_checksums()
    assert set(checksums) == {p.name for p in DATA_DIR.glob("*.jsonl.gz")} == {
        "mooncake_conversation_trace.jsonl.gz", "mooncake_synthetic_trace.jsonl.gz"}
    for name, (size, digest) in checksums.items():
        raw = gzip.decompress((DATA_DIR / name).read_bytes())
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, digest), name
    with open_trace(DATA_DIR / "mooncake_synthetic_trace.jsonl.gz") as fh:
        assert sum(1 for _ in fh) == 3993


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 90) == pytest.approx(90)


def _run(policy: str, cached: list[int], workers: list[int], errors: int = 0) -> RunResult:
    recs = []
    for i, (c, w) in enumerate(zip(cached, workers, strict=False)):
        recs.append(
            RequestRecord(i, f"r{i}", arrival_ms=100.0 * i, prompt_tokens=1000, max_tokens=10, worker_id=w,
                          ttft_ms=50.0 + i, e2e_ms=200.0 + i, cached_tokens=c, output_tokens=10)
        )
    for j in range(errors):
        recs.append(RequestRecord(100 + j, f"e{j}", 0.0, 1000, 10, error="epp.query:no_workers"))
    return RunResult(policy, 1.0, 10.0, recs, wall_s=1.0, worker_ids=[1, 2, 3], open_bookings=[])


def test_summary_hit_rate_balance_errors():
    s = summarize(_run("kv", [500, 0, 500, 1000], [1, 1, 2, 2], errors=2))
    assert s["requests"] == 6 and s["completed"] == 4 and s["errors"] == 2
    assert s["error_kinds"] == {"epp.query:no_workers": 2}
    assert s["hit_rate"] == pytest.approx(2000 / 4000)
    assert s["requests_per_worker"] == {"1": 2, "2": 2, "3": 0}  # idle workers count toward imbalance
    assert s["balance_max_over_mean"] == pytest.approx(1500 / (2000 / 3))
    assert s["ttft_ms"]["p50"] == pytest.approx(51.5)
    assert s["open_bookings"] == 0


def test_report_files(tmp_path):
    runs = [_run("kv", [500] * 4, [1, 2, 3, 1]), _run("round_robin", [0] * 4, [1, 2, 3, 1])]
    paths = write_report(runs, tmp_path, {"trace": "x"})
    doc = json.loads(paths["json"].read_text())
    assert [r["policy"] for r in doc["runs"]] == ["kv", "round_robin"]
    table = paths["markdown"].read_text()
    assert "| kv |" in table and "50.0 %" in table and "| round_robin |" in table
    # one load point: bars per policy, no line chart through single points
    for key in ("ttft_cdf", "policies"):
        assert paths[key].stat().st_size > 5000 and paths[key].read_bytes()[:4] == b"\x89PNG"
    assert "load" not in paths
    assert markdown_table([summarize(runs[0])]).count("\n") >= 3
    # several load points: lines against load
    heavier = [_run("kv", [500] * 4, [1, 2, 3, 1]), _run("round_robin", [0] * 4, [1, 2, 3, 1])]
    for run in heavier:
        run.rate_scale = 2.0
    paths = write_report(runs + heavier, tmp_path / "two", {"trace": "x"})
    assert paths["load"].read_bytes()[:4] == b"\x89PNG" and "policies" not in paths


def test_a_lagging_fleet_is_flagged_with_its_figures(tmp_path):
    calm, late = _run("round_robin", [0] * 4, [1, 2, 3, 1]), _run("kv", [500] * 4, [1, 2, 3, 1])
    calm.fleet = {"lag_max_ms": LAG_WARN_MS / 2, "lag_total_ms": 60.0, "late_passes": 3}
    late.fleet = {"lag_max_ms": 548.0, "lag_total_ms": 2_345.0, "late_passes": 41}
    warnings = lag_warnings([summarize(calm), summarize(late)])
    assert warnings == ["kv (load ×1): the fleet lagged its clock by up to 548 ms (41 late passes, 2,345 ms in all)"]
    report = write_report([calm, late], tmp_path, {"trace": "x"})["markdown"].read_text()
    assert "Indicative only" in report and "548 ms" in report
    # the offline simulator has no wall clock to lag: never flagged
    offline = write_report([late], tmp_path / "off", {"mode": "offline (discrete-event, simulated time)"})["markdown"].read_text()
    assert "Indicative" not in offline and "simulated time of the discrete-event simulator" in offline
