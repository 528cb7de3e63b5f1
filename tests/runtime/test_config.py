"""Settings: flags beat KVR_* environment variables, which beat defaults."""

from __future__ import annotations

import argparse

from services.runtime.config import COMMON, Setting, add_settings, resolve

EXTRA = (
    Setting("block_size", 16, "tokens per block", int),
    Setting("early_exit", False, "flag", bool),
    Setting("ports", [], "ports", int, is_list=True),
)


def parse(argv, env):
    parser = argparse.ArgumentParser()
    add_settings(parser, [*COMMON, *EXTRA])
    return resolve(parser.parse_args(argv), [*COMMON, *EXTRA], env)


def test_defaults():
    cfg = parse([], {})
    assert cfg.nats_url == "nats://127.0.0.1:4222"
    assert cfg.pool == ["default"]
    assert cfg.subject_prefix == "kvr"
    assert cfg.http_port == 0
    assert cfg.block_size == 16 and cfg.early_exit is False


def test_env_then_flags():
    env = {"KVR_POOL": "a, b", "KVR_HTTP_PORT": "9000", "KVR_BLOCK_SIZE": "64", "KVR_EARLY_EXIT": "true"}
    cfg = parse([], env)
    assert cfg.pool == ["a", "b"] and cfg.http_port == 9000 and cfg.block_size == 64 and cfg.early_exit is True
    cfg = parse(["--pool", "c", "--pool", "d,e", "--http-port", "1", "--early-exit", "false"], env)
    assert cfg.pool == ["c", "d", "e"] and cfg.http_port == 1 and cfg.early_exit is False
    assert parse(["--early-exit"], {}).early_exit is True


def test_env_names_are_derived():
    assert {s.env for s in COMMON} >= {"KVR_NATS_URL", "KVR_POOL", "KVR_SUBJECT_PREFIX", "KVR_HTTP_PORT"}


def test_int_lists_split_before_converting():
    assert parse(["--ports", "1,2", "--ports", "3"], {}).ports == [1, 2, 3]
    assert parse([], {"KVR_PORTS": "4, 5"}).ports == [4, 5]
