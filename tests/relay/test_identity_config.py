"""Relay identity (Downward API env, derived worker id) and configuration validation."""

from __future__ import annotations

import pytest
import xxhash

from services.relay.__main__ import make_app
from services.relay.app import resolve_identity, worker_id_for

from .helpers import relay_cfg


def test_worker_id_is_derived_from_the_pod_name_and_json_safe():
    wid = worker_id_for("vllm-0")
    assert wid == xxhash.xxh3_64_intdigest(b"vllm-0") & (2**53 - 1)
    assert wid < 2**53 and worker_id_for("vllm-1") != wid


def test_identity_comes_from_flags_then_downward_api_env():
    cfg = relay_cfg("nats://x:1", 1, None, "--pod-name", "", "--address", "")
    assert resolve_identity(cfg, {"POD_NAME": "p-7", "POD_IP": "10.9.8.7"}) == ("p-7", worker_id_for("p-7"), "10.9.8.7")
    cfg = relay_cfg("nats://x:1", 1, None, "--pod-name", "flag-pod", "--worker-id", "42", "--address", "1.2.3.4")
    assert resolve_identity(cfg, {"POD_NAME": "p-7", "POD_IP": "10.9.8.7"}) == ("flag-pod", 42, "1.2.3.4")


def test_app_builds_the_discovery_record_and_rank_endpoints():
    cfg = relay_cfg("nats://x:1", 6000, 7000, "--dp-start-rank", "2", "--dp-size", "2", "--dp-ports", "8000,8001",
                    "--taints", "gpu=h100", "--labels", "app=vllm,tier=a", "--role", "decode")
    app = make_app(cfg)
    assert app.endpoints == {2: "tcp://127.0.0.1:6002", 3: "tcp://127.0.0.1:6003"}
    assert app.replay_endpoints == {2: "tcp://127.0.0.1:7002", 3: "tcp://127.0.0.1:7003"}
    r = app.record
    assert (r.pool, r.pod_name, r.address, r.dp_start_rank, r.dp_size, r.dp_ports, r.role) == (
        "p", "vllm-0", "10.0.0.7", 2, 2, [8000, 8001], "decode")
    assert r.taints == ["gpu=h100"] and r.labels == {"app": "vllm", "tier": "a"} and r.endpoint(3) == "10.0.0.7:8001"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--block-size", "0"], "block_size"),
        (["--dp-size", "2", "--dp-ports", "1"], "dp_ports"),
        (["--labels", "novalue"], "key=value"),
        (["--pool", "a,b"], "exactly one pool"),
        (["--dp-size", "4", "--zmq", "tcp://a:1,tcp://b:2"], "endpoints"),
    ],
)
def test_bad_configuration_is_a_clear_startup_error(extra, message):
    with pytest.raises(SystemExit) as err:
        make_app(relay_cfg("nats://x:1", 1, None, *extra))
    assert message in str(err.value)
