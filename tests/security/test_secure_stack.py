"""Issue 16: every kvr process on a nats-server with TLS, mutual TLS and one least-privilege user per role.

One module-scoped stack (the expensive part, ~10 s): `kvr provision` with the provisioner identity, then
`kvr indexer`, `kvr scheduler` (NKEY identity), `kvr epp-bridge`, `kvr mock-workers` (development
style: the password in the URL) and `kvr relay` beside a fake vLLM engine, each with its own
identity and client certificate. The gateway path is exercised with `kvr epp query` as the gateway
identity. The last test greps every log line written by any process of this module for the secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nats.js.errors import KeyNotFoundError

from bench.lib.fake_engine import FakeEngine
from schemas import MatchReply, MatchRequest, codec
from schemas.discovery import WorkerRecord
from schemas.subjects import Names
from services.relay.app import worker_id_for
from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import PERMISSION_DENIED, ConnectionState, connect
from services.runtime.permissions import Scope
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request
from tests.relay.helpers import ports

from .secure_nats import SecureNats

pytestmark = pytest.mark.integration

NAMES = Names()
POOL = "default"
BOUND_POD, OTHER_POD = "vllm-0", "vllm-9"  # the bound relay identity may speak for vllm-0 only
TOKENS = list(range(1, 65))


class ThreadedEngine:
    """The fake vLLM engine on its own event loop in a thread, so it outlives each test's loop."""

    def __init__(self, zmq_port: int, replay_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine: FakeEngine = self.call(self._start(zmq_port, replay_port))

    @staticmethod
    async def _start(zmq_port: int, replay_port: int) -> FakeEngine:
        return FakeEngine(zmq_port, replay_port, encoding="map").start()

    def call(self, coro):  # any coroutine, its result
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def acall(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.call(self.engine.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def kvr(args: list[str], env: dict[str, str], log: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A one-shot `kvr` command; its stdout and stderr are appended to `log` (for the secret grep)."""
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    with log.open("a") as f:
        f.write(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security-logs")


@pytest.fixture(scope="module")
def secure(tmp_path_factory, logs):
    wid = worker_id_for(BOUND_POD)
    sn = SecureNats(
        tmp_path_factory.mktemp("secure-nats"),
        nkey_roles=("scheduler",),
        extra=(("relay", Scope(pools=(POOL,), relay_worker_id=wid)),),
    )
    sn.start()
    yield sn
    sn.cleanup()


@pytest.fixture(scope="module")
def stack(secure, logs):
    out = kvr(["provision", "--nats-url", secure.url], {**secure.get("provisioner").env(), "KVR_LOG_FORMAT": "json"}, logs / "provision.log")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == dict.fromkeys(
        ["KVR_BOOKINGS", "KVR_KV", "KVR_RELAY", "KVR_SNAPSHOTS", "KVR_WORKERS"], "created"
    )
    zp, rp = ports()
    engine = ThreadedEngine(zp, rp)
    mock = secure.get("mock-workers")
    url_with_password = secure.url.replace("tls://", f"tls://{mock.user}:{mock.password}@")
    mock_env = {k: v for k, v in mock.env().items() if k not in ("KVR_NATS_USER", "KVR_NATS_PASSWORD_FILE")}
    specs = {
        "indexer": ("indexer", ["--snapshot-interval-s", "0.5", "--provision", "false"], secure.get("indexer").env(), secure.url),
        "scheduler": ("scheduler", ["--router-id", "r1", "--block-size", "16"], secure.get("scheduler").env(method="nkey"), secure.url),
        "epp-bridge": ("epp-bridge", [], secure.get("epp-bridge").env(), secure.url),
        "mock-workers": ("mock-workers", ["--count", "2", "--worker-ttl-s", "3", "--block-size", "16"], mock_env, url_with_password),
        "relay": (
            "relay", ["--zmq", f"tcp://127.0.0.1:{zp}", "--replay", f"tcp://127.0.0.1:{rp}", "--block-size", "16"],
            {**secure.get("relay").env(), "POD_NAME": BOUND_POD, "POD_IP": "10.0.0.7"}, secure.url,
        ),
        # A relay whose identity is bound to vllm-0's worker, running as another pod: every
        # publish is refused by the server, logged once per subject and counted.
        "relay-wrong-pod": (
            "relay", ["--zmq", f"tcp://127.0.0.1:{zp}", "--block-size", "16", "--clear-on-start", "true"],
            {**secure.identities[f"kvr-relay-{POOL}-{worker_id_for(BOUND_POD)}"].env(), "POD_NAME": OTHER_POD}, secure.url,
        ),
    }
    procs = {
        name: ServiceProcess(cmd, args, nats_url=url, pools=[POOL], env=env, log_path=str(logs / f"{name}.log")).start()
        for name, (cmd, args, env, url) in specs.items()
    }
    state = {"procs": procs, "engine": engine, "codes": {}}
    try:
        for proc in procs.values():
            proc.wait_ready(60)
        yield state
    finally:
        stop_all(state)
        engine.close()


def stop_all(state: dict) -> dict[str, int | None]:
    """SIGTERM every process of the stack (once, side by side); their exit codes."""
    running = {name: proc for name, proc in state["procs"].items() if proc.proc is not None}
    with ThreadPoolExecutor(len(running) or 1) as pool:
        state["codes"].update(zip(running, pool.map(lambda p: p.terminate(), running.values()), strict=True))
    return state["codes"]


async def connect_as(secure: SecureNats, role: str, state: ConnectionState | None = None):
    ident = secure.get(role)
    auth = NatsAuth(user=ident.user, password_file=str(ident.password_file), tls_ca=str(ident.ca),
                    tls_cert=str(ident.cert.cert), tls_key=str(ident.cert.key))
    return await connect(secure.url, f"kvr-{role}", auth=auth, state=state, max_wait_s=10)


def denied_total(text: str, op: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'kvr_nats_permission_denied_total{{op="{op}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_every_role_connects_with_its_own_identity_and_the_gateway_path_works(secure, stack, logs):
    procs = stack["procs"]
    for name in ("indexer", "scheduler", "epp-bridge", "mock-workers", "relay"):
        body = procs[name].readyz()
        assert body["_http_status"] == 200 and body["nats"]["state"] == "connected", (name, body)
        assert "TLS (CA" in body["nats"]["tls"] and "client certificate" in body["nats"]["tls"], body["nats"]
    assert "NKEY seed file" in procs["scheduler"].readyz()["nats"]["auth"]

    # The gateway path, as the gateway identity, through the real CLI.
    out = kvr(["epp", "query", "--nats-url", secure.url, "--token-ids", ",".join(map(str, TOKENS))],
              secure.get("gateway").env(), logs / "epp-cli.log")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["status"] == "ok" and reply["decode"]["worker_id"] > 0

    # The relay's events reach the index; the operator identity may read it (indexer.match).
    engine = stack["engine"]
    await engine.acall(engine.engine.wait_subscribed())
    stored, _ = engine.engine.stored(TOKENS)
    await engine.acall(engine.engine.publish([stored]))
    nc = await connect_as(secure, "operator")
    try:
        wid = worker_id_for(BOUND_POD)
        for _ in range(100):
            res = await request(nc, NAMES.match(POOL), MatchRequest(token_ids=TOKENS), MatchReply, timeout=2)
            if any(s.worker_id == wid and s.blocks == 4 for s in res.scores):
                break
            await asyncio.sleep(0.1)
        assert any(s.worker_id == wid and s.blocks == 4 for s in res.scores), res
    finally:
        await nc.close()

    # Snapshots are written by the indexer identity (object store put: chunks, meta, purge).
    for _ in range(100):
        status = procs["indexer"].readyz()
        if status["pools"][POOL]["snapshot_seq"] > 0:
            break
        await asyncio.sleep(0.1)
    assert status["pools"][POOL]["snapshot_seq"] > 0, status

    # Expiry: a discovery record that stops heartbeating is deleted by the indexer's and the
    # schedulers' sweepers, each with its own identity (a guarded KV delete).
    writer, nc = await connect_as(secure, "mock-workers"), await connect_as(secure, "operator")
    try:
        record = WorkerRecord(worker_id=77, pool=POOL, model="m", pod_name="gone-77", heartbeat_ms=0, ttl_s=0.3)
        await (await writer.jetstream().key_value("KVR_WORKERS")).put(f"{POOL}.77", codec.encode_json(record))
        kv = await nc.jetstream().key_value("KVR_WORKERS")
        for _ in range(100):
            try:
                await kv.get(f"{POOL}.77")
            except KeyNotFoundError:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(KeyNotFoundError):
            await kv.get(f"{POOL}.77")
    finally:
        await writer.close()
        await nc.close()

    # Nothing any service did in normal operation was refused by the server.
    for name in ("indexer", "scheduler", "epp-bridge", "mock-workers", "relay"):
        metrics = procs[name].metrics()
        assert denied_total(metrics, "publish") == 0 and denied_total(metrics, "subscribe") == 0, name
        assert "nats.permission_denied" not in (logs / f"{name}.log").read_text(), name


async def test_a_relay_bound_to_one_worker_cannot_speak_for_another(secure, stack, logs):
    """The worker-bound relay identity running as another pod: refused, one log line per subject, counted."""
    proc = stack["procs"]["relay-wrong-pod"]
    for _ in range(100):
        if denied_total(proc.metrics(), "publish") >= 2:
            break
        await asyncio.sleep(0.1)
    assert denied_total(proc.metrics(), "publish") >= 2
    lines = [json.loads(line) for line in (logs / "relay-wrong-pod.log").read_text().splitlines() if "nats.permission_denied" in line]
    subjects = [line["subject"] for line in lines]
    other = worker_id_for(OTHER_POD)
    assert f"$kv.kvr_workers.{POOL}.{other}" in subjects  # its discovery record (nats-py lower-cases the text)
    assert f"$kv.kvr_relay.{POOL}.{other}.0" in subjects  # its event-id reservation, needed before any event
    assert len(subjects) == len(set(subjects)), "one line per subject, however often it is retried"


async def test_the_relay_identity_cannot_publish_bookings_or_another_pools_events(secure, stack):
    state = ConnectionState()
    before = {op: PERMISSION_DENIED.labels(op)._value.get() for op in ("publish", "subscribe")}
    nc = await connect_as(secure, "relay", state)
    js = nc.jetstream()
    try:
        bookings_before = (await js.stream_info("KVR_BOOKINGS")).state.messages
        forbidden = [NAMES.bookings_subject(POOL, "r1"), NAMES.kv_subject("other", 1, 0), NAMES.select(POOL)]
        for subject in forbidden:
            await nc.publish(subject, b"{}")
        await nc.subscribe(NAMES.epp_query(POOL))  # reading the gateway's requests: refused too
        await nc.subscribe("_INBOX.epp-bridge.>")  # and another role's replies
        await nc.flush()
        for _ in range(50):
            if state.denied_total >= 5:
                break
            await asyncio.sleep(0.05)
        assert state.denied["publish"] == set(forbidden)
        assert state.denied["subscription"] == {NAMES.epp_query(POOL), "_inbox.epp-bridge.>"}
        assert PERMISSION_DENIED.labels("publish")._value.get() - before["publish"] == 3
        assert PERMISSION_DENIED.labels("subscribe")._value.get() - before["subscribe"] == 2
        # The connection survives a refusal, and nothing reached the bookings stream.
        assert nc.is_connected and (await js.stream_info("KVR_BOOKINGS")).state.messages == bookings_before
    finally:
        await nc.close()


EXPECTED_FAILURES = {
    "wrong_password": ("authorization", "rejected the credentials"),
    "unknown_ca": ("tls", "certificate is not trusted"),
    "missing_client_cert": ("tls", "requires a client certificate"),
}


def test_a_bad_credential_keeps_the_service_unready_with_one_clear_line(secure, stack, logs):
    """Wrong password, untrusted server CA, no client certificate: three indexers side by side."""
    procs = {}
    for case in EXPECTED_FAILURES:
        env = secure.get("indexer").env()
        if case == "wrong_password":
            bad = logs / "wrong.password"
            bad.write_text("not-the-password\n")
            env["KVR_NATS_PASSWORD_FILE"] = str(bad)
        elif case == "unknown_ca":
            env["KVR_NATS_TLS_CA"] = str(secure.other_ca.cert_path)
        else:
            del env["KVR_NATS_TLS_CERT"], env["KVR_NATS_TLS_KEY"]
        log = logs / f"indexer-{case}.log"
        procs[case] = ServiceProcess("indexer", nats_url=secure.url, pools=[POOL], env=env, log_path=str(log)).start()
    try:
        bodies: dict[str, dict] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(bodies) < len(procs):
            for case, proc in procs.items():
                try:
                    body = proc.readyz()
                except OSError:
                    continue
                if body.get("nats", {}).get("attempts", 0) >= 4:  # retried with backoff, still not ready
                    bodies[case] = body
            time.sleep(0.1)
        for case, (kind, text) in EXPECTED_FAILURES.items():
            body = bodies[case]
            assert body["_http_status"] == 503 and body["status"] == "not_ready", (case, body)
            assert body["nats"]["error_kind"] == kind and text in body["nats"]["error"], (case, body)
            assert text in body["reason"], (case, body)
            proc = procs[case]
            assert proc.proc is not None and proc.proc.poll() is None, f"{case}: the process keeps retrying, it does not exit"
            log = (logs / f"indexer-{case}.log").read_text().splitlines()
            failures = [json.loads(line) for line in log if "nats.connect_failed" in line]
            assert len(failures) == 1, (case, failures)  # one line however many attempts (≥ 4 here)
            assert failures[0]["level"] == "error" and text in failures[0]["reason"], (case, failures)
    finally:
        assert [proc.terminate() for proc in procs.values()] == [0, 0, 0]


async def test_tls_handshake_first(tmp_path):
    sn = SecureNats(tmp_path, handshake_first=True).start()
    try:
        ident = sn.get("operator")
        common = dict(user=ident.user, password_file=str(ident.password_file), tls_ca=str(ident.ca),
                      tls_cert=str(ident.cert.cert), tls_key=str(ident.cert.key))
        nc = await connect(sn.url, "kvr-operator", auth=NatsAuth(**common, tls_handshake_first=True), max_wait_s=10)
        assert nc.is_connected
        await nc.close()
        state = ConnectionState()
        with pytest.raises(ConnectionError):
            await connect(sn.url, "kvr-operator", auth=NatsAuth(**common), state=state, connect_timeout=0.5, max_wait_s=1)
        assert state.error_kind == "timeout" and "KVR_NATS_TLS_HANDSHAKE_FIRST" in (state.error or "")
    finally:
        sn.cleanup()


def test_no_log_line_of_this_module_contains_a_secret(secure, stack, logs):
    """Runs last in this module: every process's stdout/stderr to its exit, the CLI outputs, the server log."""
    assert stop_all(stack) == dict.fromkeys(stack["procs"], 0), "every service drains and exits 0 on SIGTERM"
    server_log = (secure.base / "nats-server.log").read_text()
    (logs / "nats-server.log").write_text(server_log)
    # To the end (deregistration, the last snapshot, drains) no kvr identity was refused anything,
    # except the relay deliberately running as the wrong pod.
    for name in ("indexer", "scheduler", "epp-bridge", "mock-workers", "relay", "provision", "epp-cli"):
        assert "permission_denied" not in (logs / f"{name}.log").read_text(), name
    violations = [line for line in server_log.splitlines() if "Violation" in line]
    # Only the two relay identities of the refusal tests were refused (`KVR/user:kvr-relay-default...`).
    assert violations and all(f"/user:kvr-relay-{POOL}" in line for line in violations), violations
    secrets = secure.secrets()
    assert len(secrets) >= 10
    files = sorted(logs.glob("*.log"))
    assert {"indexer.log", "scheduler.log", "epp-bridge.log", "relay.log", "mock-workers.log", "provision.log"} <= {f.name for f in files}
    for path in files:
        text = path.read_text()
        for secret in secrets:
            assert secret not in text, f"{path.name} contains a secret"
    # The development-style URL credentials are shown redacted where the URL is printed.
    mock_log = (logs / "mock-workers.log").read_text()
    assert "kvr-mock-workers:***@" in mock_log and '"event": "service.started"' in mock_log


def test_a_service_that_may_not_create_streams_waits_for_kvr_provision(tmp_path):
    """Least-privilege users on a fresh server: the indexer says why it is not ready, keeps waiting, and
    is ready once `kvr provision` (the provisioner identity) has created the streams."""
    sn = SecureNats(tmp_path / "nats").start()
    log = tmp_path / "indexer.log"
    proc = ServiceProcess("indexer", nats_url=sn.url, pools=[POOL], env=sn.get("indexer").env(), log_path=str(log)).start()
    try:
        deadline, body = time.monotonic() + 40, {}
        while time.monotonic() < deadline and "kvr provision" not in body.get("reason", ""):
            with contextlib.suppress(OSError):
                body = proc.readyz()
            time.sleep(0.2)
        assert body["_http_status"] == 503 and "may not create" in body["reason"], body
        assert "$js.api.stream.create.kvr_kv" in body["reason"]
        assert proc.proc is not None and proc.proc.poll() is None
        out = kvr(["provision", "--nats-url", sn.url], sn.get("provisioner").env(), tmp_path / "provision.log")
        assert out.returncode == 0, out.stderr
        proc.wait_ready(60)
        waiting = [line for line in log.read_text().splitlines() if "provision.waiting" in line]
        assert len(waiting) == 1, waiting  # one line for the cause, however many retries
    finally:
        assert proc.terminate() == 0
        sn.cleanup()
