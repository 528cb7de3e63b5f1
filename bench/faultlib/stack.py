"""The system under test as processes: nats-server (or a 3-node cluster) and every kvr service.

`Stack` starts them in a safe order, kills and restarts any of them, and reads what each one says
about itself: `/readyz`, `/metrics`, `/digest` (the fingerprint of its replicated state) and its RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from schemas.subjects import Names
from services.runtime.embedded import NatsCluster, NatsServer
from services.runtime.procs import SCRAPE_ERRORS, ServiceProcess

NAMES = Names()
INDEXERS = ("indexer-a", "indexer-b")


@dataclass(frozen=True)
class StackConfig:
    pool: str = "faults"
    cluster: bool = False  # a 3-node JetStream cluster and R3 streams, else one nats-server
    indexers: int = 2
    schedulers: int = 2
    workers: int = 4  # simulated engines in the one `kvr mock-workers` process
    worker_id_base: int = 100
    kv_blocks: int = 256  # per worker: small, so the load evicts (removed events) as well as stores
    block_size: int = 16
    speedup: float = 20.0
    # The indexers snapshot often, so a restarted one restores a snapshot and replays only the tail.
    snapshot_every_events: int = 500
    snapshot_interval_s: float = 1.0
    log_level: str = "info"

    @property
    def worker_ids(self) -> list[int]:
        return [self.worker_id_base + i for i in range(self.workers)]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def http_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); (0, {}) when nothing answers (not listening yet, or killed)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except SCRAPE_ERRORS:
        return 0, {}
    except ValueError:
        return 0, {}


@dataclass
class Stack:
    cfg: StackConfig
    workdir: Path
    nats_server: NatsServer | NatsCluster | None = None
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    nc: NATS | None = None

    # ---- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.nats_server is not None
        return self.nats_server.url

    @property
    def nodes(self) -> list[NatsServer]:
        if isinstance(self.nats_server, NatsCluster):
            return self.nats_server.nodes
        assert isinstance(self.nats_server, NatsServer)
        return [self.nats_server]

    def service_names(self, kind: str) -> list[str]:
        return [n for n in self.procs if n.startswith(kind)]

    # ---- lifecycle ------------------------------------------------------------------------------

    def _common(self) -> list[str]:
        args = ["--log-level", self.cfg.log_level]
        if self.cfg.cluster:
            args += ["--stream-replicas", "3"]
        return args

    def _process(self, name: str, command: str, args: list[str]) -> ServiceProcess:
        return ServiceProcess(command, args=[*self._common(), *args], nats_url=self.url, pools=[self.cfg.pool],
                              log_path=str(self.workdir / f"{name}.log"))

    def indexer_args(self) -> list[str]:
        return ["--snapshot-every-events", str(self.cfg.snapshot_every_events), "--snapshot-interval-s", str(self.cfg.snapshot_interval_s)]

    async def start(self) -> Stack:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.cfg.cluster:
            self.nats_server = NatsCluster().start()
        else:
            self.nats_server = NatsServer(log_file=str(self.workdir / "nats-server.log")).start()
        c = self.cfg
        names = [f"indexer-{chr(ord('a') + i)}" for i in range(c.indexers)]
        for name in names:
            self.procs[name] = self._process(name, "indexer", self.indexer_args())
        for i in range(c.schedulers):
            self.procs[f"scheduler-s{i + 1}"] = self._process(f"scheduler-s{i + 1}", "scheduler", ["--router-id", f"s{i + 1}"])
        self.procs["bridge"] = self._process("bridge", "epp-bridge", [])
        self.procs["workers"] = self._process("workers", "mock-workers", [
            "--count", str(c.workers), "--worker-id-base", str(c.worker_id_base), "--block-size", str(c.block_size),
            "--kv-blocks", str(c.kv_blocks), "--speedup", str(c.speedup), "--load-interval-s", "0",
        ])
        # The first indexer provisions the streams (with R3 on a cluster, once the meta leader is
        # elected); the others start once they exist, so no two processes race to create them.
        first = self.procs[names[0]].start()
        await asyncio.to_thread(first.wait_ready, 90)
        for name, proc in self.procs.items():
            if name != names[0]:
                proc.start()
        await self.wait_ready(timeout=90)
        self.nc = await nats.connect(self.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="faults-harness",
                                     error_cb=_quiet, disconnected_cb=_quiet_event, reconnected_cb=_quiet_event)
        await self.wait_workers_seen(timeout=60)
        return self

    async def wait_ready(self, names: list[str] | None = None, timeout: float = 60.0) -> float:
        """Until every named process (default: all) answers /readyz 200; returns the seconds waited."""
        started = time.monotonic()
        for name in names or list(self.procs):
            remaining = max(1.0, timeout - (time.monotonic() - started))
            await asyncio.to_thread(self.procs[name].wait_ready, remaining)
        return time.monotonic() - started

    async def wait_workers_seen(self, timeout: float = 60.0) -> None:
        """Until every scheduler lists every simulated worker as a candidate."""
        want = set(self.cfg.worker_ids)
        deadline = time.monotonic() + timeout
        while True:
            seen = [set((await self.scheduler_state(n)).get("workers", [])) for n in self.service_names("scheduler")]
            if all(want <= s for s in seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"schedulers see workers {seen}, want {sorted(want)}")
            await asyncio.sleep(0.2)

    async def scheduler_state(self, name: str) -> dict[str, Any]:
        from schemas.api import StateReply, StateRequest
        from services.runtime.responder import request

        assert self.nc is not None
        router_id = name.rsplit("-", 1)[1]
        try:
            reply = await request(self.nc, f"{NAMES.scheduler_state(self.cfg.pool)}.{router_id}", StateRequest(), StateReply, timeout=5)
        except Exception:  # noqa: BLE001 - not serving yet, or killed
            return {}
        return {"workers": reply.workers, "bookings": reply.bookings, "digest": reply.digest, "stream_seq": reply.stream_seq}

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no final snapshot, no goodbye to NATS."""
        self.procs[name].kill()

    def restart(self, name: str) -> None:
        self.procs[name].start()

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
        for proc in reversed(list(self.procs.values())):
            proc.terminate()
        if self.nats_server is not None:
            self.nats_server.cleanup()

    # ---- what the processes say ------------------------------------------------------------------

    def port(self, name: str) -> int:
        return self.procs[name].http_port

    def readyz(self, name: str) -> tuple[int, dict[str, Any]]:
        return http_json(self.port(name), "/readyz", timeout=2.0)

    def digest(self, name: str) -> dict[str, Any]:
        return http_json(self.port(name), "/digest", timeout=30.0)[1]

    def metric(self, name: str, prefix: str, timeout: float = 1.0) -> float:
        """Sum of the samples of `/metrics` lines starting with `prefix` (name plus optional labels);
        NaN when it does not answer (killed, paused, too loaded)."""
        scrape = self.procs[name].scrape("/metrics", timeout)
        if not scrape.ok:
            return float("nan")
        return sum(float(line.rsplit(" ", 1)[1]) for line in scrape.body.splitlines() if line.startswith(prefix))

    def rss(self) -> dict[str, float | None]:
        out = {name: rss_mb(p.proc.pid if p.proc else None) for name, p in self.procs.items()}
        for i, node in enumerate(self.nodes):
            out[f"nats-{i}" if len(self.nodes) > 1 else "nats-server"] = rss_mb(node.proc.pid if node.proc else None)
        return out

    def kv_applied(self, name: str) -> int | None:
        """The KV stream sequence this process has applied (indexers, and schedulers' index replicas)."""
        value = self.metric(name, 'kvr_follower_applied_seq{follower="indexer-kv"')
        return None if value != value else int(value)  # NaN: not answering


async def _quiet(_exc: Exception) -> None:
    """The harness expects its connection to break (that is the fault); nats-py would log each
    failed reconnect attempt with a traceback."""


async def _quiet_event() -> None:
    return None


def witness(stack: Stack) -> ServiceProcess:
    """A fresh indexer that replays the whole KV stream from its first message: no snapshot restored,
    none written, no endpoints. What every replica must equal once it has applied the same stream."""
    return stack._process("witness", "indexer", [
        "--snapshot-restore", "false", "--snapshot-every-events", "0", "--snapshot-interval-s", "0", "--serve-endpoints", "false",
    ])
