"""The faults, each under load, each measured the same way.

A scenario runs gateway load and a probe publisher, injects its fault after `warmup_s`, repairs it
after `down_s` (restart the process or the server), waits until the system has converged, keeps the
load going for `after_s`, stops it, waits `cleanup_window_s`, then measures:

- events accepted by JetStream (probe acks + the simulated workers' acknowledged events) and how
  many of them the stream does not hold (lost, must be 0);
- every index replica and a fresh witness at the stream's last sequence: identical digests;
  the schedulers' load views: identical;
- errors during the fault (requests in flight between the fault and convergence), by code, and
  errors outside it (must be none);
- time to converge: from the fault until every process is ready again and every replica has applied
  what the streams held when the fault was repaired;
- bookings left after the cleanup window (must be 0; the schedulers keep their production TTLs,
  60 s unconfirmed / 300 s, so the window is far shorter than any expiry that could hide a leak);
- RSS of every process before the fault and at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .audit import audit_stream, bookings_after, compare_replicas
from .load import GatewayLoad, ProbePublisher
from .stack import NAMES, Stack


@dataclass(frozen=True)
class LoadConfig:
    rate: float = 25.0  # gateway queries per second
    probe_rate: float = 20.0  # probe KV messages per second
    warmup_s: float = 3.0  # load before the fault; RSS "before" is read at its end
    down_s: float = 2.0  # how long the killed process or server stays down
    after_s: float = 3.0  # load after convergence
    cleanup_window_s: float = 5.0  # after the last request ended, until bookings are counted
    converge_timeout_s: float = 120.0


@dataclass
class FaultResult:
    scenario: str
    fault: str
    accepted: int = 0
    lost: int = 0
    identical: bool = False
    errors_during_fault: dict[str, int] = field(default_factory=dict)
    errors_outside_fault: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    converge_s: float | None = None
    ready_after_repair_s: float | None = None
    leaked_bookings: int | None = None
    bookings_gone_after_s: float | None = None
    rss_before_mb: dict[str, float | None] = field(default_factory=dict)
    rss_after_mb: dict[str, float | None] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)
    replicas: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0  # monotonic times, for timelines
    fault_at: float = 0.0
    repaired_at: float = 0.0
    converged_at: float | None = None
    load_stopped_at: float = 0.0
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)

    def ok(self) -> bool:
        return (self.lost == 0 and self.identical and self.leaked_bookings == 0 and not self.errors_outside_fault
                and self.converge_s is not None and not self.stream.get("workers_metrics_error"))

    def summary(self) -> str:
        def fmt(d: dict[str, Any]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

        growth = {k: round((self.rss_after_mb.get(k) or 0) - (v or 0), 1) for k, v in self.rss_before_mb.items() if v is not None}
        return "\n".join([
            f"== {self.scenario}: {self.fault}",
            f"   events accepted {self.accepted}, lost {self.lost}; replicas identical: {self.identical}"
            f" (diverged: {self.replicas.get('diverged')})"
            + (f"; loss unknown: {self.stream['workers_metrics_error']}" if self.stream.get("workers_metrics_error") else ""),
            f"   requests {sum(self.requests.values())}: errors during the fault: {fmt(self.errors_during_fault)}; "
            f"outside it: {fmt(self.errors_outside_fault)}",
            f"   converged {self.converge_s} s after the fault ({self.ready_after_repair_s} s after the repair); "
            f"bookings left after the cleanup window: {self.leaked_bookings} (all gone after {self.bookings_gone_after_s} s)",
            "   RSS MB before → after: " + ", ".join(
                f"{k} {self.rss_before_mb.get(k)}→{self.rss_after_mb.get(k)}" for k in self.rss_before_mb),
            f"   RSS growth MB: {growth}",
        ] + ([f"   leader: {self.details.get('killed_node')} killed, {self.details['leader_while_down']} elected "
              f"{self.details.get('new_leader_within_s')} s later"] if "leader_while_down" in self.details else []))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("outcomes")
        for key in ("started_at", "fault_at", "repaired_at", "converged_at", "load_stopped_at"):
            out.pop(key)
        out["ok"] = self.ok()
        return out


Step = Callable[[], Awaitable[dict[str, Any] | None]]


@dataclass
class Session:
    """One stack, faults one after another; every audit covers the whole stream so far."""

    stack: Stack
    load: LoadConfig = LoadConfig()
    probes: list[ProbePublisher] = field(default_factory=list)
    progress: Callable[[str], None] = lambda _msg: None

    async def run(self, scenario: str, fault: str, inject: Step, repair: Step, observe: Step | None = None) -> FaultResult:
        """`inject` the fault after the warm-up, `repair` it `down_s` later, `observe` (optional)
        once the system has converged; everything each returns goes into `details`."""
        stack, lc = self.stack, self.load
        assert stack.nc is not None
        res = FaultResult(scenario, fault)
        probe = ProbePublisher(stack.nc, stack.cfg.pool, worker_id=9_000 + len(self.probes), rate=lc.probe_rate)
        await probe.register()
        self.probes.append(probe)
        gateway = GatewayLoad(stack.nc, stack.cfg.pool, lc.rate, pods=[f"mock-{w}" for w in stack.cfg.worker_ids],
                              seed=len(self.probes), tag=f"{scenario}-{len(self.probes)}")
        stop = asyncio.Event()
        res.started_at = time.monotonic()
        tasks = [asyncio.create_task(gateway.run(stop)), asyncio.create_task(probe.run(stop))]
        try:
            await asyncio.sleep(lc.warmup_s)
            res.rss_before_mb = stack.rss()
            self.progress(f"{scenario}: {fault}")
            res.fault_at = time.monotonic()
            res.details.update(await inject() or {})
            await asyncio.sleep(lc.down_s)
            res.details.update(await repair() or {})
            res.repaired_at = time.monotonic()
            converged = await wait_converged(stack, lc.converge_timeout_s)
            if converged is not None:
                res.converged_at = converged
                res.converge_s = round(converged - res.fault_at, 2)
                res.ready_after_repair_s = round(converged - res.repaired_at, 2)
            if observe is not None:
                res.details.update(await observe() or {})
            self.progress(f"{scenario}: converged after {res.converge_s} s; load continues {lc.after_s} s")
            await asyncio.sleep(lc.after_s)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        res.load_stopped_at = time.monotonic()
        window_end = res.converged_at if res.converged_at is not None else float("inf")
        res.errors_during_fault = gateway.errors(res.fault_at, window_end)
        res.errors_outside_fault = {
            k: v - res.errors_during_fault.get(k, 0) for k, v in gateway.errors().items() if v > res.errors_during_fault.get(k, 0)
        }
        res.requests = gateway.counts()
        res.outcomes = [(o.start, o.end, o.code) for o in gateway.outcomes]
        res.details["error_examples"] = gateway.examples
        res.details.update(cleanup_retries=gateway.cleanup_retries, cleanup_failures=gateway.cleanup_failures,
                           probe_retries=probe.retries, probe_duplicate_acks=probe.duplicates, probe_given_up=probe.given_up)
        self.progress(f"{scenario}: load stopped; cleanup window {lc.cleanup_window_s} s")
        held, gone = await bookings_after(stack, lc.cleanup_window_s)
        res.details["bookings_held"] = held
        res.leaked_bookings = max(held.values()) if held and all(v >= 0 for v in held.values()) else None
        res.bookings_gone_after_s = None if gone is None else round(gone, 2)
        self.progress(f"{scenario}: auditing the stream and the replicas")
        audit = await audit_stream(stack, self.probes)
        res.stream = audit.as_dict()
        res.accepted, res.lost = audit.accepted, audit.lost
        replicas = await compare_replicas(stack)
        res.replicas = replicas.as_dict()
        res.identical = replicas.index_identical and replicas.load_identical
        res.rss_after_mb = stack.rss()
        return res


async def _stream_last(stack: Stack, stream: str, timeout: float) -> int:
    assert stack.nc is not None
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await stack.nc.jetstream().stream_info(stream)).state.last_seq
        except Exception:  # server restarting, leader moving
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def wait_converged(stack: Stack, timeout: float, poll_s: float = 0.2) -> float | None:
    """The moment every process is ready and every replica keeps up with both streams again: it has
    applied what the KV and bookings streams held one poll earlier, and both streams have grown
    since the repair (so a feed that stalled after the fault, while its process still looked ready,
    does not count as recovered). None on timeout."""
    deadline = time.monotonic() + timeout
    at_repair = (await _stream_last(stack, NAMES.kv_stream, timeout), await _stream_last(stack, NAMES.bookings_stream, timeout))
    replicas = [*stack.service_names("indexer"), *stack.service_names("scheduler")]
    schedulers = stack.service_names("scheduler")
    previous: tuple[int, int] | None = None
    while time.monotonic() < deadline:
        try:
            now = (await _stream_last(stack, NAMES.kv_stream, 5), await _stream_last(stack, NAMES.bookings_stream, 5))
        except Exception:  # noqa: BLE001 - the server is not answering yet
            await asyncio.sleep(poll_s)
            continue
        statuses = {n: await asyncio.to_thread(stack.readyz, n) for n in stack.procs}
        grown = previous is not None and previous[0] > at_repair[0] and previous[1] > at_repair[1]
        if previous is not None and grown and all(code == 200 for code, _ in statuses.values()):
            kv_applied = [await asyncio.to_thread(stack.kv_applied, n) for n in replicas]
            bookings_applied = [int(statuses[n][1].get("applied_seq") or 0) for n in schedulers]
            if all((a or 0) >= previous[0] for a in kv_applied) and all(b >= previous[1] for b in bookings_applied):
                return time.monotonic()
        previous = now
        await asyncio.sleep(poll_s)
    return None


# ---- the faults ---------------------------------------------------------------------------------


async def kill_process(session: Session, name: str) -> FaultResult:
    stack = session.stack

    async def inject() -> dict[str, Any]:
        stack.kill(name)
        return {"killed": name}

    async def repair() -> None:
        stack.restart(name)

    return await session.run(f"kill-{name}", f"SIGKILL {name} under load, restart it after {session.load.down_s} s", inject, repair)


async def kill_nats(session: Session) -> FaultResult:
    stack = session.stack
    server = stack.nodes[0]

    async def inject() -> None:
        server.kill()

    async def repair() -> None:
        await asyncio.to_thread(server.start)

    async def observe() -> dict[str, Any]:
        assert stack.nc is not None
        return {"harness_reconnects": stack.nc.stats["reconnects"]}

    return await session.run("kill-nats-server", f"SIGKILL nats-server under load, restart it (same port and store) after "
                             f"{session.load.down_s} s", inject, repair, observe)


ALL_STREAMS = (NAMES.kv_stream, NAMES.bookings_stream, f"KV_{NAMES.workers_bucket}")


async def stream_leaders(stack: Stack, timeout: float = 15.0, streams: tuple[str, ...] = ALL_STREAMS) -> dict[str, str | None]:
    """The node leading each of `streams` (None: no leader within `timeout`, e.g. an election running)."""
    assert stack.nc is not None
    js = stack.nc.jetstream()
    out: dict[str, str | None] = {}
    deadline = time.monotonic() + timeout
    for stream in streams:
        out[stream] = None
        while time.monotonic() < deadline:
            try:
                info = await js.stream_info(stream)
            except Exception:  # noqa: BLE001 - no leader yet, or our connection is moving to another node
                await asyncio.sleep(0.2)
                continue
            out[stream] = info.cluster.leader if info.cluster else None
            break
    return out


async def leader_other_than(stack: Stack, stream: str, node: str, timeout: float) -> str | None:
    """The first leader of `stream` reported that is not `node` (None: none within `timeout`)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        leader = (await stream_leaders(stack, timeout=left, streams=(stream,)))[stream]
        if leader not in (None, node):
            return leader
        await asyncio.sleep(0.2)
    return None


async def kill_stream_leader(session: Session, stream: str = NAMES.kv_stream) -> FaultResult:
    """3-node cluster, R3 streams: SIGKILL the node leading `stream`, restart it after down_s."""
    stack = session.stack
    victim: dict[str, Any] = {}

    async def inject() -> dict[str, Any]:
        leaders = await stream_leaders(stack)
        leader = leaders[stream]
        assert leader is not None, f"{stream} has no cluster leader"
        index = int(leader.rsplit("n", 1)[1])  # nodes are named kvr-n0, kvr-n1, kvr-n2
        victim["node"], victim["leader"] = stack.nodes[index], leader
        victim["node"].kill()
        victim["killed_at"] = time.monotonic()
        return {"leaders_before": leaders, "killed_node": leader}

    async def repair() -> dict[str, Any]:
        # The failover itself is what this scenario checks: the survivors elect a leader while the
        # victim is still down. Once it is back it may win a later election, so leadership after the
        # repair says nothing about failover.
        elected = await leader_other_than(stack, stream, victim["leader"], timeout=20.0)
        down_s = time.monotonic() - victim["killed_at"]
        await asyncio.to_thread(victim["node"].start)
        return {"leader_while_down": elected, "new_leader_within_s": round(down_s, 2)}

    async def observe() -> dict[str, Any]:
        return {"leaders_after": await stream_leaders(stack)}

    return await session.run(f"kill-{stream}-leader", f"3-node cluster, R3 streams: SIGKILL the node leading {stream}, "
                             f"restart it once the survivors elected a leader (at least {session.load.down_s} s)", inject, repair, observe)
