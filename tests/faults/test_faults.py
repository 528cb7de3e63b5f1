"""Faults under load, with real processes: nats-server (one, or a 3-node cluster with R3 streams),
`kvr indexer` ×2, `kvr scheduler` ×2, `kvr epp-bridge`, `kvr mock-workers`; this process is the
gateway (epp.query → generate → epp.cleanup) and a probe publisher that remembers every ack.

The short versions of bench/faults.py, on the same code (bench/faultlib/). After every fault:
no event JetStream acknowledged is missing from the stream, every index replica equals a fresh
replica that replays the whole stream, the schedulers' load views are identical, no booking is left
after the cleanup window, and no request failed outside the fault window. docs/reliability.md
lists what each scenario checks and the figures of the long runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faultlib.scenarios import FaultResult, LoadConfig, Session, kill_nats, kill_process, kill_stream_leader
from bench.faultlib.stack import Stack, StackConfig

pytestmark = pytest.mark.integration

LOAD = LoadConfig(rate=20.0, probe_rate=20.0, warmup_s=2.0, down_s=1.5, after_s=1.5, cleanup_window_s=3.0, converge_timeout_s=90.0)
# What a request may answer while a fault lasts: never `internal`, never a wrong answer.
TRANSIENT = {"epp.query:timeout", "epp.query:no_reply", "generate:timeout", "generate:no_responders"}


def check(res: FaultResult, allowed_errors: set[str]) -> None:
    print(res.summary())
    assert res.accepted > 0 and res.lost == 0, res.stream
    assert res.identical, res.replicas
    assert res.replicas["stream_last_seq"] > 0 and not res.replicas["diverged"]
    assert res.converge_s is not None, "did not converge"
    assert res.leaked_bookings == 0, res.details
    assert res.errors_outside_fault == {}, res.details.get("error_examples")
    assert set(res.errors_during_fault) <= allowed_errors, (res.errors_during_fault, res.details.get("error_examples"))
    assert res.requests.get("ok", 0) > 0


async def test_sigkill_indexer_scheduler_and_nats_server_under_load(tmp_path: Path) -> None:
    stack = await Stack(StackConfig(), tmp_path).start()
    try:
        session = Session(stack, LOAD)
        # Schedulers hold their own index replicas: losing the indexer service costs no request.
        check(await kill_process(session, "indexer-a"), allowed_errors=set())
        # Requests in flight at the killed replica time out at the bridge (which cancels their bookings).
        check(await kill_process(session, "scheduler-s1"), allowed_errors={"epp.query:timeout"})
        res = await kill_nats(session)
        check(res, allowed_errors=TRANSIENT)
        assert res.details["harness_reconnects"] >= 1  # the outage was real
    finally:
        await stack.stop()


async def test_the_node_leading_the_kv_stream_killed_in_a_3_node_cluster(tmp_path: Path) -> None:
    stack = await Stack(StackConfig(cluster=True), tmp_path).start()
    try:
        res = await kill_stream_leader(Session(stack, LOAD))
        check(res, allowed_errors=TRANSIENT)
        assert res.details["killed_node"] == res.details["leaders_before"]["KVR_KV"]
        # failover: a surviving node took the lead while the victim was down; after the repair some
        # node leads (the restarted one may win a later election: that is not a failure)
        assert res.details["leader_while_down"] not in (None, res.details["killed_node"])
        assert res.details["leaders_after"]["KVR_KV"] is not None
    finally:
        await stack.stop()
