"""Replay a trace through the router the way a gateway would, against a simulated fleet.

Per request: wait for its (scaled) arrival time → `epp.query` with `nvext.token_data` and the policy
→ generate on the chosen worker → `epp.cleanup prefill_complete` at the first token → `epp.cleanup
free` at the end (also after any failure once the request was booked).

Clocks: the fleet divides every simulated duration by `speedup`, and arrivals are divided by the same
factor, so the load is the trace's (times `rate_scale`) and only wall time shrinks. Latencies are
measured by this client in wall time and multiplied back by `speedup`, i.e. reported in simulated
milliseconds. NATS and router overheads get multiplied too, so a very high speed-up overstates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError

from schemas import codec
from schemas.api import CleanupReply, CleanupRequest, EppQueryReply, EppQueryRequest, Policy, StateReply, StateRequest
from schemas.codec import RemoteError, SchemaError
from schemas.subjects import Names
from schemas.worker import GenerateDone, GenerateFirstToken, GenerateProgress, GenerateRequest
from services.runtime.logs import get_logger
from services.runtime.responder import request

from .trace import TokenExpander, TraceRequest

log = get_logger("kvr.replay")


@dataclass(frozen=True)
class ReplayConfig:
    pool: str = "default"
    policy: Policy = Policy.KV
    speedup: float = 1.0
    rate_scale: float = 1.0
    concurrency: int = 512
    max_output_tokens: int | None = None
    request_timeout_s: float = 300.0
    rpc_timeout_s: float = 5.0
    model: str = "mock-model"
    salt: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy(self.policy))  # a name from the CLI, validated


@dataclass
class RequestRecord:
    index: int
    request_id: str
    arrival_ms: float  # simulated, relative to the first request
    prompt_tokens: int
    max_tokens: int
    worker_id: int | None = None
    overlap_blocks: int = 0
    ttft_ms: float | None = None  # client-measured, simulated ms
    e2e_ms: float | None = None
    cached_tokens: int | None = None  # from the worker's own accounting
    output_tokens: int = 0
    worker_ttft_ms: float | None = None
    preemptions: int = 0
    route_ms: float | None = None  # wall-clock ms of epp.query (not scaled)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_ms is not None


@dataclass
class RunResult:
    policy: str
    rate_scale: float
    speedup: float
    records: list[RequestRecord]
    wall_s: float
    worker_ids: list[int] = field(default_factory=list)
    open_bookings: list[str] | None = None
    cleanup_failures: int = 0
    fleet: dict[str, Any] = field(default_factory=dict)


class FleetHandle(Protocol):
    """A simulated fleet the replayer can start fresh for each run."""

    async def start(self) -> list[int]: ...

    async def stop(self) -> None: ...

    async def stats(self) -> dict[str, Any]: ...


class NoResponders(Exception):
    """A generate request nobody serves (the server's 503 status): not an error envelope of the
    protocol (`RemoteError`), a transport condition, counted as `generate:no_responders`."""

    code = "no_responders"


class GenerateClient:
    """Streams of generate progress over one wildcard inbox subscription."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = nc.new_inbox()
        self._sub: Subscription | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._n = 0

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_msg, pending_msgs_limit=1_000_000)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        queue = self._queues.get(msg.subject)
        if queue is None:
            return
        if msg.headers and msg.headers.get("Status") == "503":
            # The server's "no responders": nobody serves that worker's generate subject right now
            # (the worker is gone, or its NATS node died and its interest is being re-routed).
            queue.put_nowait(NoResponders(f"nobody serves {msg.headers.get('Nats-Subject', 'the subject')}"))
            return
        try:
            item: Any = codec.decode(msg.data, GenerateProgress)
        except SchemaError:
            try:
                item = codec.decode_reply(msg.data, GenerateDone)
            except (RemoteError, SchemaError) as exc:
                item = exc
        queue.put_nowait(item)

    async def open(self, subject: str, req: GenerateRequest) -> tuple[str, asyncio.Queue[Any]]:
        self._n += 1
        inbox = f"{self._prefix}.{self._n}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[inbox] = queue
        await self.nc.publish(subject, codec.encode_msgpack(req), reply=inbox, headers={codec.CONTENT_TYPE_HEADER: codec.MSGPACK})
        return inbox, queue

    def close(self, inbox: str) -> None:
        self._queues.pop(inbox, None)


async def scheduler_state(nc: NATS, names: Names, pool: str, timeout: float = 2.0) -> StateReply | None:
    try:
        return await request(nc, names.scheduler_state(pool), StateRequest(), StateReply, timeout=timeout)
    except (NoRespondersError, TimeoutError, RemoteError):
        return None
    except Exception:  # noqa: BLE001 - nats raises its own timeout type
        return None


async def wait_for_workers(nc: NATS, names: Names, pool: str, worker_ids: Sequence[int], timeout: float = 30.0) -> None:
    """Until the scheduler's live workers are exactly `worker_ids` (old fleets gone, new one seen)."""
    want = set(worker_ids)
    deadline = time.monotonic() + timeout
    last: set[int] | None = None
    while time.monotonic() < deadline:
        state = await scheduler_state(nc, names, pool)
        if state is not None:
            last = set(state.workers)
            if last == want:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"scheduler of pool {pool!r} sees workers {sorted(last or [])}, want {sorted(want)}")


async def wait_for_no_bookings(nc: NATS, names: Names, pool: str, timeout: float = 10.0) -> list[str] | None:
    """Open bookings left once frees have landed (None when the scheduler cannot be asked)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = await scheduler_state(nc, names, pool)
        if state is not None and not state.bookings:
            return []
        await asyncio.sleep(0.2)
    return list(state.bookings) if state is not None else None


class Replayer:
    def __init__(self, nc: NATS, names: Names, cfg: ReplayConfig) -> None:
        if cfg.speedup <= 0 or cfg.rate_scale <= 0:
            raise ValueError("speedup and rate_scale must be > 0")
        self.nc = nc
        self.names = names
        self.cfg = cfg
        self.expander = TokenExpander(salt=cfg.salt)
        self.cleanup_failures = 0

    async def run(
        self, requests: Sequence[TraceRequest], on_progress: Callable[[int, int], None] | None = None, run_tag: str = ""
    ) -> RunResult:
        cfg = self.cfg
        client = GenerateClient(self.nc)
        await client.start()
        sem = asyncio.Semaphore(cfg.concurrency)
        t0_trace = requests[0].timestamp_ms
        scale = cfg.speedup * cfg.rate_scale
        tag = run_tag or f"{cfg.policy}-{int(time.time() * 1000) % 10**8}"
        records: list[RequestRecord] = []
        tasks: list[asyncio.Task[None]] = []
        done_count = 0
        loop = asyncio.get_running_loop()
        start = loop.time()

        def finished(_task: asyncio.Task[None]) -> None:
            nonlocal done_count
            done_count += 1
            if on_progress:
                on_progress(done_count, len(requests))

        try:
            for req in requests:
                arrival_sim = (req.timestamp_ms - t0_trace) / cfg.rate_scale
                due = start + (req.timestamp_ms - t0_trace) / 1000.0 / scale
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                max_tokens = req.output_length or 1
                if cfg.max_output_tokens is not None:
                    max_tokens = max(1, min(max_tokens, cfg.max_output_tokens))
                rec = RequestRecord(
                    index=req.index,
                    request_id=f"{tag}-{req.index}",
                    arrival_ms=arrival_sim,
                    prompt_tokens=req.input_length,
                    max_tokens=max_tokens,
                )
                records.append(rec)
                task = asyncio.create_task(self._one(client, req, rec, due, sem))
                task.add_done_callback(finished)
                tasks.append(task)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            await client.stop()
        return RunResult(
            policy=cfg.policy,
            rate_scale=cfg.rate_scale,
            speedup=cfg.speedup,
            records=records,
            wall_s=loop.time() - start,
            cleanup_failures=self.cleanup_failures,
        )

    async def _one(self, client: GenerateClient, req: TraceRequest, rec: RequestRecord, due: float, sem: asyncio.Semaphore) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        booked = False
        try:
            tokens = self.expander.tokens(req)
            body = {
                "model": cfg.model,
                "prompt": "",
                "nvext": {"token_data": tokens, "expected_output_tokens": rec.max_tokens},
            }
            query = EppQueryRequest(request_id=rec.request_id, body=body, policy=cfg.policy)
            sent = loop.time()
            try:
                reply = await request(
                    self.nc, self.names.epp_query(cfg.pool), query, EppQueryReply, timeout=cfg.rpc_timeout_s, msgpack=True
                )
            except RemoteError as exc:
                rec.error = f"epp.query:{exc.code}"
                return
            booked = True
            rec.route_ms = (loop.time() - sent) * 1000.0
            rec.worker_id = reply.decode.worker_id
            rec.overlap_blocks = reply.overlap_blocks
            gen = GenerateRequest(
                request_id=rec.request_id, token_ids=tokens, max_tokens=rec.max_tokens, dp_rank=reply.decode.dp_rank
            )
            inbox, queue = await client.open(self.names.generate(cfg.pool, reply.decode.worker_id), gen)
            try:
                async with asyncio.timeout(cfg.request_timeout_s):
                    while True:
                        item = await queue.get()
                        now = loop.time()
                        if isinstance(item, Exception):
                            code = getattr(item, "code", "invalid_reply")
                            rec.error = f"generate:{code}"
                            return
                        if isinstance(item, GenerateFirstToken):
                            rec.ttft_ms = (now - due) * 1000.0 * cfg.speedup
                            await self._cleanup(rec.request_id, "prefill_complete")
                        elif isinstance(item, GenerateDone):
                            rec.e2e_ms = (now - due) * 1000.0 * cfg.speedup
                            if rec.ttft_ms is None:
                                rec.ttft_ms = rec.e2e_ms
                            rec.cached_tokens = item.cached_tokens
                            rec.output_tokens = item.output_tokens
                            rec.worker_ttft_ms = item.ttft_ms
                            rec.preemptions = item.preemptions
                            return
            except TimeoutError:
                rec.error = "generate:timeout"
            finally:
                client.close(inbox)
        except TimeoutError:
            rec.error = rec.error or "timeout"
        except Exception as exc:  # noqa: BLE001 - a failed request is data for the report
            rec.error = rec.error or f"{type(exc).__name__}"
            log.warning("replay.request_failed", request_id=rec.request_id, error=str(exc) or type(exc).__name__)
        finally:
            sem.release()
            if booked:
                await self._cleanup(rec.request_id, "free")

    async def _cleanup(self, request_id: str, phase: str) -> None:
        for attempt in range(3):
            try:
                await request(
                    self.nc,
                    self.names.epp_cleanup(self.cfg.pool),
                    CleanupRequest(request_id=request_id, phase=phase),  # type: ignore[arg-type]
                    CleanupReply,
                    timeout=self.cfg.rpc_timeout_s,
                )
                return
            except Exception:  # noqa: BLE001 - retried; cleanup is idempotent
                await asyncio.sleep(0.05 * (attempt + 1))
        self.cleanup_failures += 1


async def run_policy(
    nc: NATS,
    names: Names,
    requests: Sequence[TraceRequest],
    cfg: ReplayConfig,
    fleet: FleetHandle | None,
    on_progress: Callable[[int, int], None] | None = None,
    fleet_timeout_s: float = 60.0,
) -> RunResult:
    """One policy run: start a fresh fleet (when given), wait until routed to, replay, check bookings."""
    worker_ids: list[int] = []
    if fleet is not None:
        worker_ids = await fleet.start()
    try:
        if fleet is not None:
            await wait_for_workers(nc, names, cfg.pool, worker_ids, timeout=fleet_timeout_s)
        result = await Replayer(nc, names, cfg).run(requests, on_progress)
        result.worker_ids = worker_ids
        result.open_bookings = await wait_for_no_bookings(nc, names, cfg.pool)
        if fleet is not None:
            try:
                result.fleet = await fleet.stats()
            except Exception as exc:  # noqa: BLE001 - stats are informative only
                log.warning("replay.fleet_stats_failed", error=str(exc))
        return result
    finally:
        if fleet is not None:
            await fleet.stop()

