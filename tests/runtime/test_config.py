"""Settings: flags beat KVR_* environment variables, which beat defaults; each command's settings
are one frozen, typed config, and one service embeds another's with `embed`."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path

import pytest

from services.runtime.config import COMMON, Config, ServiceConfig, add_settings, config, embed, resolve, setting

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@config
class ExtraConfig(ServiceConfig):
    block_size: int = setting(16, "tokens per block")
    early_exit: bool = setting(False, "flag")
    ports: tuple[int, ...] = setting((), "ports")
    threshold: float | None = setting(None, "off unless set")


@config
class Inner(ServiceConfig):
    block_size: int = setting(16, "tokens per block")
    snapshots: int = setting(100, "inner only")


@config
class Outer(ServiceConfig):
    block_size: int = setting(32, "tokens per block (the outer's declaration wins)")
    inner: Inner = embed(Inner, snapshots=0)


def parse(argv: list[str], env: dict[str, str], cls: type[Config] = ExtraConfig):
    parser = argparse.ArgumentParser()
    add_settings(parser, cls.settings())
    return resolve(parser.parse_args(argv), cls, env)


def test_defaults():
    cfg = parse([], {})
    assert isinstance(cfg, ExtraConfig)
    assert cfg.nats_url == "nats://127.0.0.1:4222"
    assert cfg.pool == ("default",)
    assert cfg.subject_prefix == "kvr"
    assert cfg.http_port == 0
    assert cfg.block_size == 16 and cfg.early_exit is False and cfg.threshold is None


def test_env_then_flags():
    env = {"KVR_POOL": "a, b", "KVR_HTTP_PORT": "9000", "KVR_BLOCK_SIZE": "64", "KVR_EARLY_EXIT": "true", "KVR_THRESHOLD": "0.5"}
    cfg = parse([], env)
    assert cfg.pool == ("a", "b") and cfg.http_port == 9000 and cfg.block_size == 64 and cfg.early_exit is True
    assert cfg.threshold == 0.5
    cfg = parse(["--pool", "c", "--pool", "d,e", "--http-port", "1", "--early-exit", "false", "--threshold", "2"], env)
    assert cfg.pool == ("c", "d", "e") and cfg.http_port == 1 and cfg.early_exit is False and cfg.threshold == 2.0
    assert parse(["--threshold", "off"], {}).threshold is None
    # "off" on the command line wins over the variable (argparse's None would mean "not given")
    assert parse(["--threshold", "off"], {"KVR_THRESHOLD": "0.5"}).threshold is None


def test_a_threshold_on_by_default_can_be_turned_off_by_flag():
    from services.scheduler.settings import SchedulerConfig

    assert SchedulerConfig.from_argv([], env={}).routing.active_decode_blocks_threshold == 0.9
    assert SchedulerConfig.from_argv(["--active-decode-blocks-threshold", "off"], env={}).routing.active_decode_blocks_threshold is None
    assert parse(["--early-exit"], {}).early_exit is True


def test_env_names_are_derived():
    assert {s.env for s in COMMON} >= {"KVR_NATS_URL", "KVR_POOL", "KVR_SUBJECT_PREFIX", "KVR_HTTP_PORT"}


def test_int_lists_split_before_converting():
    assert parse(["--ports", "1,2", "--ports", "3"], {}).ports == (1, 2, 3)
    assert parse([], {"KVR_PORTS": "4, 5"}).ports == (4, 5)


def test_parsers_come_from_the_annotations():
    by_name = {s.name: s for s in ExtraConfig.settings()}
    assert by_name["block_size"].type is int and by_name["early_exit"].type is bool
    assert by_name["ports"].is_list and by_name["ports"].type is int and by_name["ports"].default == []
    assert by_name["threshold"].parse("off") is None and by_name["threshold"].parse("2") == 2.0


def test_a_config_is_frozen_and_has_no_unknown_settings():
    cfg = ExtraConfig.build(block_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.typo = 1
    with pytest.raises(AttributeError):
        _ = cfg.blocksize
    with pytest.raises(TypeError, match="no settings"):
        ExtraConfig.build(blocksize=8)
    assert cfg.with_values(block_size=9).block_size == 9 and cfg.block_size == 8


def test_embedding_shares_one_value_per_setting():
    # The embedding command parses the inner's settings too; its own declaration wins a shared name,
    # and the embedding defaults replace the inner's.
    names = [s.name for s in Outer.settings()]
    assert names == [*(s.name for s in COMMON), "block_size", "snapshots"]
    by_name = {s.name: s for s in Outer.settings()}
    assert by_name["block_size"].default == 32 and by_name["snapshots"].default == 0
    cfg = parse(["--pool", "x", "--block-size", "8"], {"KVR_SNAPSHOTS": "5"}, Outer)
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert cfg.inner.pool == ("x",) and cfg.inner.block_size == 8 and cfg.inner.snapshots == 5
    assert Outer().inner.snapshots == 0 and Outer().inner.block_size == 32
    # Built or constructed directly, the inner config follows the outer's shared values.
    assert Outer(block_size=4).inner.block_size == 4
    assert Outer.build(snapshots=7, pool=["y"]).inner == Inner.build(snapshots=7, pool=["y"], block_size=32)
    assert Outer.build(snapshots=7).values()["snapshots"] == 7


def test_the_services_embed_each_other():
    from services.epp_bridge.settings import EppBridgeConfig
    from services.indexer.settings import IndexerConfig
    from services.scheduler.settings import SchedulerConfig

    bridge = EppBridgeConfig.build(pool=["p"], block_size=32, snapshot_interval_s=5.0, epp_embedded_scheduler=True)
    assert isinstance(bridge.scheduler, SchedulerConfig) and isinstance(bridge.scheduler.index, IndexerConfig)
    assert bridge.scheduler.pool == bridge.scheduler.index.pool == ("p",)
    assert bridge.scheduler.block_size == bridge.scheduler.index.block_size == 32
    assert bridge.scheduler.index.snapshot_interval_s == 5.0
    # the routing settings (shared with `kvr replay --offline`) follow the bridge's flags too
    assert EppBridgeConfig.build(queue_max_size=3, cost_rule="dynamo").scheduler.routing.cost().clip_prefill
    assert EppBridgeConfig.build(queue_max_size=3).scheduler.routing.queue_max_size == 3
    # A scheduler's index replica writes no snapshots unless asked; the indexer service does.
    assert SchedulerConfig().index.snapshot_interval_s == 0.0 and IndexerConfig().snapshot_interval_s > 0


def test_secrets_are_redacted_in_repr():
    from services.epp_bridge.settings import EppBridgeConfig

    cfg = EppBridgeConfig.build(
        nats_url="nats://kvr:hunter2@127.0.0.1:4222", nats_password_file="/run/secrets/pw", nats_token_file="/run/tok",
        nats_user="kvr", grpc_tls_key="/tls/key.pem", nats_creds="/c.creds",
    )
    text = repr(cfg) + str(cfg)
    for secret in ("hunter2", "/run/secrets/pw", "/run/tok", "/tls/key.pem", "/c.creds"):
        assert secret not in text
    assert "nats_user='kvr'" in text and "nats_password_file='***'" in text


def test_mypy_sees_the_setting_types(tmp_path: Path):
    """What the type checker makes of a config: typed attributes, no assignment, no unknown names."""
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent("""
        from services.epp_bridge.settings import EppBridgeConfig
        cfg = EppBridgeConfig.build()
        reveal_type(cfg.grpc_port)
        reveal_type(cfg.scheduler.index.snapshot_interval_s)
        reveal_type(cfg.scheduler.routing.active_decode_blocks_threshold)
        reveal_type(cfg.pool)
        cfg.grpc_port = 1
        cfg.grpc_prot
    """))
    out, _err, _status = api.run([
        "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(REPO / ".mypy_cache"),
        "--follow-imports", "silent", str(snippet),
    ])
    assert 'Revealed type is "int"' in out and 'Revealed type is "float"' in out
    assert 'Revealed type is "float | None"' in out and 'Revealed type is "tuple[str, ...]"' in out
    assert 'Property "grpc_port" defined in "EppBridgeConfig" is read-only' in out
    assert '"EppBridgeConfig" has no attribute "grpc_prot"' in out
