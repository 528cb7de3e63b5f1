"""Adapter: N simulated engines in one process, each a discovery record + generate endpoint + KV events.

Each `MockWorker` runs its `Engine` against the wall clock: a pass that the timing model says takes
`d` simulated ms ends `d / speedup` real seconds after it started. Deadlines are absolute, so the
event loop's sleep jitter does not accumulate; when the process falls behind, the next pass starts
at the current time (the lag shows up as extra latency, as it would on an overloaded engine).

Generate protocol (docs/simulation.md): request `kvr.{pool}.worker.{id}.generate` with a reply
inbox; the worker publishes `first_token` then `done` (or one error envelope) to that inbox. With an
OpenAI port configured each worker also serves `/v1/completions` and `/v1/chat/completions` over
HTTP (`openai_http.py`) on the address:port of its discovery record, so a gateway can forward to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import codec
from schemas.api import ErrorCode
from schemas.codec import SchemaError
from schemas.discovery import LoadReport, WorkerRecord
from schemas.hashing import MmObject
from schemas.subjects import Names
from schemas.worker import GenerateDone, GenerateFirstToken, GenerateRequest
from services.runtime.kv_publisher import KvEventPublisher, OutBuffer, made_events
from services.runtime.logs import get_logger
from services.runtime.service import Runtime
from services.runtime.tasks import cancel_and_wait
from services.runtime.workers import delete_worker, heartbeat_loop, put_worker

from . import metrics as m
from .engine import Engine, EngineConfig, PassResult, Rejected
from .settings import MockWorkersConfig

log = get_logger("kvr.mock_worker")


@dataclass(frozen=True)
class FleetConfig:
    pool: str = "default"
    count: int = 4
    worker_id_base: int = 0
    engine: EngineConfig = EngineConfig()
    speedup: float = 1.0
    model: str = "mock-model"
    ttl_s: float = 15.0
    load_interval_s: float = 1.0
    event_batch: int = 64
    max_inflight_acks: int = 256
    fused_decode_steps: int = 64
    # OpenAI HTTP front: -1 = none (the record then carries a synthetic port), 0 = a free port per
    # worker, N = worker i on N + i.
    openai_port: int = -1
    openai_host: str = "127.0.0.1"
    tokenizer_dir: str = ""

    @classmethod
    def from_cfg(cls, cfg: MockWorkersConfig) -> FleetConfig:
        return cls(
            pool=cfg.pool[0],
            count=cfg.count,
            worker_id_base=cfg.worker_id_base,
            engine=EngineConfig(
                block_size=cfg.block_size,
                kv_blocks=cfg.kv_blocks,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_num_seqs=cfg.max_num_seqs,
                watermark=cfg.watermark,
            ),
            speedup=cfg.speedup,
            model=cfg.model,
            ttl_s=cfg.worker_ttl_s,
            load_interval_s=cfg.load_interval_s,
            event_batch=cfg.event_batch,
            max_inflight_acks=cfg.max_inflight_acks,
            fused_decode_steps=cfg.fused_decode_steps,
            openai_port=cfg.openai_port,
            openai_host=cfg.openai_host,
            tokenizer_dir=cfg.tokenizer_dir,
        )


def clock_worker_id_base() -> int:
    """Fresh ids per start (multiples of 1000, below 2**53) so a restarted fleet never aliases old state."""
    return (int(time.time() * 10) % 9_000_000_000) * 1000 + 1000


class MockWorker:
    def __init__(self, nc: NATS, names: Names, fleet: FleetConfig, worker_id: int, tokenizer: Any = None, index: int = 0) -> None:
        if fleet.speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.nc = nc
        self.names = names
        self.fleet = fleet
        self.pool = fleet.pool
        self.worker_id = worker_id
        self.speedup = fleet.speedup
        self.engine = Engine(fleet.engine, worker_id, 0, first_event_id=time.time_ns() // 1000)
        self.publisher = KvEventPublisher(
            nc.jetstream(),
            pool=fleet.pool,
            worker_id=worker_id,
            subject_of=lambda rank: names.kv_subject(fleet.pool, worker_id, rank),
            # Engines wait (back-pressure) while this is full: nothing is dropped.
            buffer=OutBuffer(made_events, max_batches=4 * fleet.max_inflight_acks),
            msgpack=False,
            timeout_s=5.0,
            max_events=fleet.event_batch,
            max_inflight=fleet.max_inflight_acks,
            metrics=m.PublishCounters(),
            name=f"mock-{worker_id}-kv",
        )
        self._replies: dict[str, str] = {}
        # HTTP requests in flight: request id → queue of ("progress", tokens so far) / ("done", Finished)
        self._streams: dict[str, asyncio.Queue[tuple[str, Any]]] = {}
        self.index = index  # position in its fleet (HTTP port = openai_port + index)
        self.tokenizer = tokenizer  # PoolTokenizer of the HTTP front (text prompts), or None
        self.http: Any = None  # OpenAiFront while serving HTTP
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        self._t0 = 0.0
        self._sim_ms = 0.0
        self.registered = False
        self.label = str(worker_id)
        self.fused_decode_steps = fleet.fused_decode_steps
        self.lag_max_ms = 0.0
        self.lag_total_ms = 0.0
        self.lag_passes = 0

    @property
    def record(self) -> WorkerRecord:
        cfg = self.fleet.engine
        return WorkerRecord(
            worker_id=self.worker_id,
            pool=self.pool,
            model=self.fleet.model,
            pod_name=f"mock-{self.worker_id}",
            address=self.address,
            # synthetic without the HTTP front (the worker then speaks NATS only)
            port=self.http.port if self.http is not None else 10_000 + self.worker_id % 50_000,
            block_size=cfg.block_size,
            total_kv_blocks=cfg.kv_blocks,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            labels={"kvr.dev/mock": "true"},
            heartbeat_ms=int(time.time() * 1000),
            ttl_s=self.fleet.ttl_s,
        )

    @property
    def address(self) -> str:
        host = self.fleet.openai_host
        return "127.0.0.1" if self.http is None or host in ("", "0.0.0.0", "::") else host

    def sim_now(self) -> float:
        return (asyncio.get_running_loop().time() - self._t0) * 1000.0 * self.speedup

    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        if self.fleet.openai_port >= 0:
            from .openai_http import OpenAiFront

            port = self.fleet.openai_port + self.index if self.fleet.openai_port else 0
            self.http = OpenAiFront(self, self.tokenizer)
            await self.http.start(self.fleet.openai_host, port)
        self.engine.announce_cleared()
        self.publisher.start()
        await self.publisher.publish(self.engine.drain_events())
        self._sub = await self.nc.subscribe(
            self.names.generate(self.pool, self.worker_id), cb=self._on_generate, pending_msgs_limit=1_000_000
        )
        await put_worker(self.nc, self.names.workers_bucket, self.record)
        self.registered = True
        self._tasks = [
            asyncio.create_task(self._run(), name=f"mock-{self.worker_id}-engine"),
            asyncio.create_task(self._heartbeat(), name=f"mock-{self.worker_id}-heartbeat"),
        ]
        if self.fleet.load_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._load_reports(), name=f"mock-{self.worker_id}-load"))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await cancel_and_wait(self._tasks)
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.stop()
        await self.publisher.flushed(5)
        await self.publisher.stop()
        if self.registered:
            with contextlib.suppress(Exception):
                await delete_worker(self.nc, self.names.workers_bucket, self.pool, self.worker_id)
            self.registered = False
        for gauge in (m.KV_USED_BLOCKS, m.KV_ACTIVE_BLOCKS, m.RUNNING, m.WAITING):
            with contextlib.suppress(KeyError):
                gauge.remove(self.label)

    # -- generate endpoint
    async def _on_generate(self, msg: Msg) -> None:
        ctype = codec.content_type_of(msg.headers)
        try:
            req = codec.decode(msg.data, GenerateRequest, ctype)
        except SchemaError as exc:
            m.REQUESTS.labels("invalid_request").inc()
            await self._reply_error(msg.reply, ErrorCode.INVALID_REQUEST, exc.message, exc.path)
            return
        if req.dp_rank != 0:
            m.REQUESTS.labels("invalid_request").inc()
            await self._reply_error(msg.reply, ErrorCode.INVALID_REQUEST, f"dp_rank {req.dp_rank} not served (dp_size 1)", "$.dp_rank")
            return
        if not msg.reply:
            m.REQUESTS.labels("no_reply").inc()
            return
        rejected = self.engine.submit(
            req.request_id, req.token_ids, req.max_tokens, self.sim_now(), req.lora_name, req.cache_salt
        )
        if rejected is not None:
            m.REQUESTS.labels("rejected").inc()
            await self._reply_error(msg.reply, ErrorCode.INVALID_REQUEST, rejected.reason, None)
            return
        self._replies[req.request_id] = msg.reply
        self._wake.set()

    def submit_local(
        self,
        request_id: str,
        token_ids: list[int],
        max_tokens: int,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        multimodal: list[MmObject] | None = None,
    ) -> asyncio.Queue[tuple[str, Any]] | Rejected:
        """An in-process request (the HTTP front): its progress and end come on the returned queue."""
        rejected = self.engine.submit(request_id, token_ids, max_tokens, self.sim_now(), lora_name, cache_salt, multimodal)
        if rejected is not None:
            m.REQUESTS.labels("rejected").inc()
            return rejected
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._streams[request_id] = queue
        self._wake.set()
        return queue

    def forget(self, request_id: str) -> None:
        """The HTTP client went away: stop reporting (the engine still finishes the request)."""
        self._streams.pop(request_id, None)

    async def _reply_error(self, reply: str | None, code: ErrorCode, message: str, path: str | None) -> None:
        if reply:
            with contextlib.suppress(Exception):
                await self.nc.publish(reply, codec.encode_json(codec.error_reply(code, message, path)))

    # -- engine loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.engine.idle:
                self._wake.clear()
                await self._wake.wait()
            start = max(self._sim_ms, self.sim_now())
            result = await self._fused_decode(start) if self.fused_decode_steps > 1 else None
            if result is None:
                result = self.engine.step(start)
            if result.duration_ms <= 0:
                await self._deliver(result)
                # nothing could be scheduled (should not happen); do not spin
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.01)
                continue
            self._sim_ms = result.end_ms
            delay = self._t0 + result.end_ms / 1000.0 / self.speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                # Behind the wall clock: the process cannot keep up with this speed-up. The lag
                # becomes simulated latency, so it is measured and reported.
                lag_ms = -delay * 1000.0 * self.speedup
                self.lag_max_ms = max(self.lag_max_ms, lag_ms)
                self.lag_total_ms += lag_ms
                self.lag_passes += 1
                m.LAG.observe(lag_ms / 1000.0)
                await asyncio.sleep(0)  # let request handlers run even when behind
            await self._deliver(result)

    async def _fused_decode(self, start: float) -> PassResult | None:
        """Pure-decode passes simulated in one go, cut at the pass boundary after a new arrival.

        Stepping every decode pass costs ~0.3 ms of Python per pass with 50 sequences; at speed-up
        10 that is most of a core per worker. The outcome is the same as stepping (tested), except
        that KV events inside the fused span are grouped per sequence rather than per pass.
        """
        plan = self.engine.plan_decode(self.fused_decode_steps)
        if not plan:
            return None
        loop = asyncio.get_running_loop()
        self._wake.clear()
        end_real = self._t0 + (start + plan[-1]) / 1000.0 / self.speedup
        steps = len(plan)
        timeout = end_real - loop.time()
        if timeout > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                elapsed = self.sim_now() - start
                steps = max(1, sum(1 for t in plan if t <= elapsed))
            except TimeoutError:
                pass
        return self.engine.commit_decode(start, plan, steps)

    async def _deliver(self, result: PassResult) -> None:
        if result.events:
            await self.publisher.publish(result.events)
        for ft in result.first_tokens:
            reply = self._replies.get(ft.request_id)
            if reply:
                msg = GenerateFirstToken(
                    request_id=ft.request_id,
                    worker_id=self.worker_id,
                    queue_ms=ft.queue_ms,
                    ttft_ms=ft.at_ms - ft.arrival_ms,
                )
                await self.nc.publish(reply, codec.encode_json(msg))
        for fin in result.finished:
            reply = self._replies.pop(fin.request_id, None)
            ttft = fin.first_token_ms - fin.arrival_ms
            m.REQUESTS.labels("ok").inc()
            m.PROMPT_TOKENS.inc(fin.prompt_tokens)
            m.CACHED_TOKENS.inc(fin.cached_tokens)
            m.OUTPUT_TOKENS.inc(fin.output_tokens)
            m.PREEMPTIONS.inc(fin.preemptions)
            m.TTFT.observe(ttft / 1000.0)
            if reply:
                done = GenerateDone(
                    request_id=fin.request_id,
                    worker_id=self.worker_id,
                    prompt_tokens=fin.prompt_tokens,
                    cached_tokens=fin.cached_tokens,
                    output_tokens=fin.output_tokens,
                    ttft_ms=ttft,
                    e2e_ms=fin.at_ms - fin.arrival_ms,
                    preemptions=fin.preemptions,
                )
                await self.nc.publish(reply, codec.encode_json(done))
            stream = self._streams.pop(fin.request_id, None)
            if stream is not None:
                stream.put_nowait(("done", fin))
        if self._streams:
            for seq in self.engine.running:
                stream = self._streams.get(seq.request_id)
                if stream is not None and seq.generated:
                    stream.put_nowait(("progress", seq.generated))
        eng = self.engine
        m.KV_USED_BLOCKS.labels(self.label).set(eng.pool.used)
        m.KV_ACTIVE_BLOCKS.labels(self.label).set(eng.pool.active)
        m.RUNNING.labels(self.label).set(len(eng.running))
        m.WAITING.labels(self.label).set(len(eng.waiting))

    # -- discovery and load
    async def _heartbeat(self) -> None:
        await heartbeat_loop(self._beat, max(self.fleet.ttl_s / 3.0, 0.05))

    async def _beat(self) -> bool:
        try:
            await asyncio.wait_for(put_worker(self.nc, self.names.workers_bucket, self.record), 5)
            return True
        except Exception as exc:  # noqa: BLE001 - keep beating; retried soon (heartbeat_loop)
            log.warning("mock.heartbeat_failed", worker_id=self.worker_id, error=str(exc) or type(exc).__name__)
            return False

    async def _load_reports(self) -> None:
        subject = self.names.load_subject(self.pool, self.worker_id)
        while True:
            await asyncio.sleep(self.fleet.load_interval_s)
            eng = self.engine
            report = LoadReport(
                worker_id=self.worker_id,
                active_decode_blocks=eng.pool.active,
                active_prefill_tokens=sum(s.target - s.computed for s in eng.running if s.prefilling),
                kv_used_blocks=eng.pool.used,
                kv_total_blocks=eng.pool.capacity,
                num_requests_running=len(eng.running),
                num_requests_waiting=len(eng.waiting),
                ts_ms=int(time.time() * 1000),
            )
            with contextlib.suppress(Exception):
                await self.nc.publish(subject, codec.encode_json(report))

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            **self.engine.status(),
            "kv_publish_failures": self.publisher.failures,
            "lag_max_ms": round(self.lag_max_ms, 1),
            "lag_total_ms": round(self.lag_total_ms, 1),
            "late_passes": self.lag_passes,
        }


class MockFleet:
    """N workers sharing one NATS connection; usable in-process (replay, tests) or via MockFleetApp."""

    def __init__(self, nc: NATS, names: Names, fleet: FleetConfig) -> None:
        base = fleet.worker_id_base or clock_worker_id_base()
        self.fleet = fleet
        tokenizer = None
        if fleet.tokenizer_dir:
            from services.epp_bridge.tokenizer import PoolTokenizer

            tokenizer = PoolTokenizer.load(fleet.tokenizer_dir)  # one copy for every worker
        self.workers = [MockWorker(nc, names, fleet, base + i, tokenizer, i) for i in range(fleet.count)]

    @property
    def worker_ids(self) -> list[int]:
        return [w.worker_id for w in self.workers]

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))
        log.info("mock.fleet_started", pool=self.fleet.pool, workers=self.worker_ids, speedup=self.fleet.speedup,
                 openai=[f"{w.address}:{w.http.port}" for w in self.workers if w.http is not None] or None)

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        log.info("mock.fleet_stopped", pool=self.fleet.pool, workers=self.worker_ids)

    def totals(self) -> dict[str, int]:
        keys = ("requests", "finished", "prompt_tokens", "cached_tokens", "preemptions", "evictions")
        out = dict.fromkeys(keys, 0)
        for w in self.workers:
            st = w.engine.status()
            for k in keys:
                out[k] += int(st[k])
        return out


class MockFleetApp:
    """`ServiceApp` for `kvr mock-workers`."""

    def __init__(self, cfg: MockWorkersConfig) -> None:
        self.cfg = cfg
        self.fleet_cfg = FleetConfig.from_cfg(cfg)
        self.fleet: MockFleet | None = None
        self._ready = False

    async def start(self, rt: Runtime) -> None:
        self.fleet = MockFleet(rt.nc, rt.names, self.fleet_cfg)
        await self.fleet.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        if self.fleet is not None:
            await self.fleet.stop()

    def ready(self) -> bool:
        return self._ready

    def status(self) -> dict[str, Any]:
        if self.fleet is None:
            return {}
        return {
            "pool": self.fleet_cfg.pool,
            "worker_ids": self.fleet.worker_ids,
            "totals": self.fleet.totals(),
            "workers": [w.status() for w in self.fleet.workers],
        }
