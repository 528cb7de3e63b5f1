"""The shared service lifecycle in a real process: NATS retry at start, readiness, /metrics, SIGTERM → exit 0."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import nats
import pytest

from services.runtime.embedded import NatsServer, free_port

APP = textwrap.dedent(
    """
    import sys
    from schemas import CleanupReply, CleanupRequest
    from services.runtime.responder import serve
    from services.runtime.config import ServiceConfig
    from services.runtime.service import main_for

    class Echo:
        def __init__(self, cfg): self.ok = False
        async def start(self, rt):
            async def handle(req, _msg): return CleanupReply(request_id=req.request_id, known=True)
            await serve(rt.nc, "echo." + rt.pools[0], CleanupRequest, handle, queue="echo")
            self.ok = True
        async def stop(self): pass
        def ready(self): return self.ok
        def status(self): return {"echo": True}

    sys.exit(main_for("echo", "test service", ServiceConfig, Echo))
    """
)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.integration
def test_service_waits_for_nats_then_serves_and_drains_on_sigterm(tmp_path):
    script = tmp_path / "echo_service.py"
    script.write_text(APP)
    nats_port, http_port = free_port(), free_port()
    env = {**os.environ, "KVR_NATS_URL": f"nats://127.0.0.1:{nats_port}", "KVR_HTTP_PORT": str(http_port),
           "KVR_POOL": "p1", "KVR_LOG_FORMAT": "json", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = NatsServer(port=nats_port)
    try:
        wait_for(lambda: get(http_port, "/healthz")[0] == 200)
        assert get(http_port, "/readyz")[0] == 503  # no NATS yet: alive but not ready
        server.start()  # NATS arrives late; the service must connect by itself
        wait_for(lambda: get(http_port, "/readyz")[0] == 200)

        async def call() -> bytes:
            nc = await nats.connect(server.url)
            try:
                msg = await nc.request("echo.p1", b'{"request_id": "r-9", "phase": "free"}', timeout=2)
                return msg.data
            finally:
                await nc.close()

        assert b'"known":true' in asyncio.run(call())
        status, metrics = get(http_port, "/metrics")
        assert status == 200 and 'kvr_requests_total{endpoint="echo.p1",outcome="ok"} 1.0' in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        output = proc.stdout.read().decode()
        assert '"event": "service.stopped"' in output
        # A clean shutdown logs nothing above info (closing our own connection is not a disconnect).
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        stopping = next(i for i, line in enumerate(lines) if line["event"] == "service.stopping")
        assert [line for line in lines[stopping:] if line["level"] not in ("debug", "info")] == []
        assert any(line["event"] == "nats.closed" for line in lines[stopping:])
        # The startup heap (modules, the connection) is frozen out of the cyclic collector's full scans.
        started = next(json.loads(line) for line in output.splitlines() if '"service.started"' in line)
        assert started["gc_frozen_objects"] > 10_000
        assert "nats.connect_failed" in output  # it retried before NATS existed
    finally:
        if proc.poll() is None:
            proc.kill()
        server.cleanup()


def test_cluster_helper_provisions_replicated_streams(nats_cluster):
    from schemas.subjects import Names
    from services.runtime.natsio import StreamSettings, provision

    async def run() -> dict:
        nc = await nats.connect(nats_cluster.url.split(","))
        try:
            js = nc.jetstream()
            for _ in range(100):  # wait for the JetStream meta leader
                try:
                    return await provision(js, Names(), StreamSettings(replicas=3))
                except Exception:  # noqa: BLE001
                    await asyncio.sleep(0.2)
            raise AssertionError("cluster never became ready")
        finally:
            await nc.close()

    result = asyncio.run(run())
    assert result["KVR_KV"] in ("created", "exists")


@pytest.mark.integration
def test_a_service_waits_for_the_jetstream_of_a_forming_cluster(tmp_path):
    """One node of three is up: connections work, JetStream does not (no meta leader). The service
    keeps retrying provisioning, says why, and is ready once the cluster is (the fault suite starts
    every service against a cluster that is still forming)."""
    from services.runtime.embedded import NatsCluster
    from services.runtime.procs import ServiceProcess

    cluster = NatsCluster().start(count=1)
    log = tmp_path / "indexer.log"
    proc = ServiceProcess("indexer", args=["--stream-replicas", "3"], nats_url=cluster.url, pools=["p"], log_path=str(log))
    try:
        proc.start()
        wait_for(lambda: "provision.waiting" in log.read_text(), timeout=30)
        assert proc.proc is not None and proc.proc.poll() is None
        assert get(proc.http_port, "/readyz")[0] == 503
        cluster.start_node(1)
        cluster.start_node(2)
        proc.wait_ready(60)
        assert '"provision.done"' in log.read_text()
        assert proc.terminate() == 0
    finally:
        proc.kill()
        cluster.cleanup()


@pytest.mark.unit
def test_freeze_startup_heap_takes_existing_objects_out_of_collection():
    from services.runtime.heap import freeze_startup_heap

    cycle: list = []
    cycle.append(cycle)
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is cycle for o in gc.get_objects())  # a full collection no longer scans it
        fresh: list = []
        fresh.append(fresh)
        assert any(o is fresh for o in gc.get_objects(generation=0))  # later objects are collected as usual
    finally:
        gc.unfreeze()
    assert any(o is cycle for o in gc.get_objects())


@pytest.mark.integration
def test_embedded_server_picks_other_ports_when_its_port_was_taken(monkeypatch):
    """Another process can bind a port between `free_port()` and the server's own bind."""
    import socket

    from services.runtime import embedded

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, free_port(), free_port(), free_port()])
        monkeypatch.setattr(embedded, "free_port", lambda host="127.0.0.1": next(ports))
        started = time.monotonic()
        server = embedded.NatsServer().start()
        try:
            assert server.port != taken and time.monotonic() - started < 5

            async def ping() -> None:
                nc = await nats.connect(server.url)
                await nc.flush()
                await nc.close()

            asyncio.run(ping())
        finally:
            server.cleanup()
        # A port given explicitly is not replaced: the error comes at once, not after the timeout.
        monkeypatch.undo()
        with pytest.raises(ChildProcessError):
            embedded.NatsServer(port=taken).start()
