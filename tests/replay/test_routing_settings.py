"""`kvr replay --offline` routes under the scheduler service's own routing settings: the same flags,
defaults and bounds (one declaration, `RoutingConfig`), and the same cost rule, busy thresholds and
admission queue built from them (`RoutingConfig.cost` / `.busy`, which `SchedulerApp` calls too)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from services.replay.__main__ import main as replay_main
from services.replay.offline import SERVICE_ROUTING, OfflineConfig, OfflineSim, cost_with_overrides, routing_of
from services.replay.settings import ReplayCommandConfig
from services.replay.trace import synthetic_trace, write_trace
from services.scheduler.__main__ import main as scheduler_main
from services.scheduler.app import SchedulerApp
from services.scheduler.cost import DYNAMO_COST, CostConfig
from services.scheduler.selector import BusyThresholds
from services.scheduler.settings import RoutingConfig, SchedulerConfig

NATS = "nats://127.0.0.1:1"  # never dialled: building the app needs no server

FLAG_SETS = [
    [],  # the defaults: kvr rule, busy above 0.9 of the KV blocks, queue 256 × 0.5 s
    ["--cost-rule", "dynamo", "--overlap-score-credit", "2", "--router-temperature", "0.3"],
    ["--prefill-load-scale", "0.5", "--host-cache-hit-weight", "0.5", "--disk-cache-hit-weight", "0",
     "--active-decode-blocks-threshold", "off", "--active-prefill-tokens-threshold", "5000",
     "--active-prefill-tokens-threshold-frac", "1.5", "--queue-max-size", "3", "--queue-timeout-s", "0.25"],
    ["--active-decode-blocks-threshold", "0.5", "--queue-max-size", "0"],
]


def service(flags: list[str], env: dict[str, str] | None = None) -> SchedulerApp:
    return SchedulerApp(SchedulerConfig.from_argv(["--nats-url", NATS, *flags], env=env or {}))


def test_replay_declares_the_schedulers_routing_settings_unchanged() -> None:
    ours = {s.name: s for s in ReplayCommandConfig.settings()}
    theirs = {s.name: s for s in SchedulerConfig.settings()}
    for s in RoutingConfig.settings():
        assert ours[s.name] == theirs[s.name] == s  # flag, env name, default, help, parser, choices
    assert ours["active_decode_blocks_threshold"].default == 0.9


@pytest.mark.parametrize("flags", FLAG_SETS, ids=["defaults", "dynamo", "weights+thresholds+queue", "tight"])
def test_the_offline_cli_routes_as_the_service_with_the_same_flags(tmp_path: Path, flags: list[str]) -> None:
    """What the simulator ran with (the report's per-run `fleet`, written from its `OfflineConfig`)
    equals what `SchedulerApp` builds from the same flags."""
    trace = write_trace(synthetic_trace(12, groups=2, prefix_blocks=2, seed=1), tmp_path / "t.jsonl")
    out = tmp_path / "out"
    replay_main([str(trace), "--offline", "true", "--workers", "2", "--max-output-tokens", "4", "--out", str(out),
                 "--progress", "false", *flags])
    fleet = json.loads((out / "report.json").read_text())["runs"][0]["fleet"]
    app = service(flags)
    assert fleet["cost"] == asdict(app.cost)
    assert fleet["busy"] == asdict(app.selector.busy)
    assert (fleet["queue_max_size"], fleet["queue_timeout_ms"]) == (app.cfg.routing.queue_max_size, app.cfg.routing.queue_timeout_ms)
    # and the same through the library entry (`routing_of`), which the CLI uses
    built = routing_of(ReplayCommandConfig.from_argv(flags, env={}).routing)
    assert (built["cost"], built["busy"]) == (app.cost, app.selector.busy)
    assert OfflineSim(OfflineConfig(**built)).queue.capacity == app.cfg.routing.queue_max_size


def test_environment_variables_are_read_the_same_way() -> None:
    env = {"KVR_COST_RULE": "dynamo", "KVR_ACTIVE_DECODE_BLOCKS_THRESHOLD": "off", "KVR_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC": "2",
           "KVR_QUEUE_TIMEOUT_S": "1.5"}
    ours = routing_of(ReplayCommandConfig.from_argv([], env=env).routing)
    app = service([], env)
    assert (ours["cost"], ours["busy"], ours["queue_timeout_ms"]) == (app.cost, app.selector.busy, 1500)
    assert ours["cost"] == DYNAMO_COST and ours["busy"] == BusyThresholds(active_prefill_tokens_frac=2.0)


def test_the_library_defaults_are_the_services() -> None:
    app = service([])
    cfg = OfflineConfig()
    assert (cfg.cost, cfg.busy) == (app.cost, app.selector.busy) == (CostConfig(), BusyThresholds(active_decode_blocks=0.9))
    assert (cfg.queue_max_size, cfg.queue_timeout_ms) == (256, 500) == (SERVICE_ROUTING.queue_max_size, SERVICE_ROUTING.queue_timeout_ms)


@pytest.mark.parametrize("bad", [
    ["--queue-max-size", "-1"],
    ["--queue-timeout-s", "nan"],
    ["--overlap-score-credit", "-1"],
    ["--router-temperature", "1e9"],
    ["--active-decode-blocks-threshold", "-0.5"],
    ["--active-prefill-tokens-threshold", "inf"],
    ["--cost-rule", "sglang"],
])
def test_out_of_range_values_are_refused_by_both_commands(tmp_path: Path, bad: list[str], capsys) -> None:
    trace = write_trace(synthetic_trace(4, groups=1, prefix_blocks=1), tmp_path / "t.jsonl")
    with pytest.raises(SystemExit) as replay_exit:
        replay_main([str(trace), "--offline", "true", "--out", str(tmp_path / "out"), *bad])
    replay_err = capsys.readouterr().err
    with pytest.raises(SystemExit) as scheduler_exit:
        scheduler_main(["--nats-url", NATS, *bad])  # refused before any connection
    scheduler_err = capsys.readouterr().err
    assert replay_exit.value.code == scheduler_exit.value.code == 2
    flag = bad[0]
    assert flag in replay_err.splitlines()[-1] and flag in scheduler_err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_offline_overrides_apply_over_the_settings() -> None:
    """Precedence: flags / KVR_* / defaults build the service's rule; then `--offline-overrides`:
    `rule=` switches the rule as `--cost-rule` does (weights kept) and the rule's own fields win."""
    routing = RoutingConfig.build(overlap_score_credit=2.0, router_temperature=0.1)
    assert cost_with_overrides([], routing) == routing.cost() == replace(CostConfig(), overlap_score_credit=2.0, temperature=0.1)
    as_flag = routing.with_values(cost_rule="dynamo").cost()
    assert cost_with_overrides(["rule=dynamo"], routing) == as_flag == replace(DYNAMO_COST, overlap_score_credit=2.0, temperature=0.1)
    # a rule field wins over the rule whatever the order
    assert cost_with_overrides(["decode_load_scale=0.5", "rule=dynamo"], routing) == replace(as_flag, decode_load_scale=0.5)
    assert cost_with_overrides(["rule=kvr"], RoutingConfig.build(cost_rule="dynamo")) == CostConfig()
    # a weight is a scheduler flag, not an override: the error names the flag
    for key, flag in (("overlap_score_credit", "--overlap-score-credit"), ("temperature", "--router-temperature"),
                      ("router_temperature", "--router-temperature")):
        with pytest.raises(ValueError, match=flag):
            cost_with_overrides([f"{key}=1"])
