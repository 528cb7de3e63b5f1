"""Load that keeps flowing through a fault: gateway traffic and a probe publisher.

`GatewayLoad` does what a gateway does over NATS, at a fixed rate: `epp.query` (books) → generate on
the chosen simulated worker (whose engine publishes the KV events) → `epp.cleanup prefill_complete`
at the first token → `epp.cleanup free` at the end. A query that got no reply at all is freed by
request id (the client cannot know whether it was booked); a cleanup is retried until it is answered,
as a gateway keeps retrying across a NATS outage. Every request's outcome is kept with its start and
end time, so errors can be counted inside and outside a fault window.

`ProbePublisher` publishes KV events of one registered worker, one message at a time, retrying a
message (same `Nats-Msg-Id`) until JetStream acknowledges it, and remembers every ack's sequence:
the exact list of what JetStream accepted, to check against the stream and the replicas afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from schemas import codec
from schemas.api import CleanupReply, CleanupRequest, EppPod, EppQueryReply, EppQueryRequest
from schemas.codec import RemoteError
from schemas.discovery import WorkerRecord
from schemas.events import kv_msg_id, removed_event, stored_event
from schemas.worker import GenerateDone, GenerateFirstToken, GenerateRequest
from services.replay.runner import GenerateClient
from services.runtime.responder import request
from services.runtime.workers import now_ms, put_worker

from .stack import NAMES


@dataclass
class Outcome:
    start: float  # time.monotonic()
    end: float
    code: str  # "ok", "epp.query:<code>", "epp.query:no_reply", "generate:<code>"


@dataclass
class GatewayLoad:
    nc: NATS
    pool: str
    rate: float  # queries per second
    pods: list[str]  # the gateway's candidate pods (the simulated workers' pod names)
    seed: int = 1
    tag: str = "q"
    block_size: int = 16
    groups: int = 8  # shared system prompts
    prefix_blocks: int = 6
    rpc_timeout_s: float = 3.0
    generate_timeout_s: float = 10.0
    cleanup_deadline_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    cleanup_retries: int = 0
    cleanup_failures: int = 0
    inflight: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # first error message per code

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._n = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._client = GenerateClient(self.nc)
        self._pods = [EppPod(name=name) for name in self.pods]

    def _prompt(self) -> list[int]:
        rng, bs = self._rng, self.block_size
        group = rng.randrange(self.groups)
        prefix = [1000 * (group + 1) + i for i in range(self.prefix_blocks * bs)]
        private = [rng.randrange(100_000, 1_000_000) for _ in range(bs * rng.randint(1, 4))]
        return prefix + private

    async def run(self, stop: asyncio.Event) -> None:
        """Issue queries at `rate` until `stop` is set, then wait for every request to finish."""
        await self._client.start()
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate
        due = loop.time()
        try:
            while not stop.is_set():
                self._n += 1
                task = asyncio.create_task(self._one(f"{self.tag}-{self._n}", self._prompt()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                due += period
                delay = due - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                else:
                    due = loop.time()  # fell behind (a stalled loop): do not burst to catch up
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            await self._client.stop()

    async def _one(self, rid: str, tokens: list[int]) -> None:
        start = time.monotonic()
        self.inflight += 1
        code = "ok"
        try:
            body = {"model": "mock-model", "prompt": "", "nvext": {"token_data": tokens}}
            query = EppQueryRequest(request_id=rid, body=body, pods=self._pods)
            try:
                reply = await request(self.nc, NAMES.epp_query(self.pool), query, EppQueryReply, timeout=self.rpc_timeout_s, msgpack=True)
            except RemoteError as exc:
                code = f"epp.query:{exc.code}"  # the bridge never books on an error reply
                self.examples.setdefault(code, exc.message)
                return
            except Exception:  # noqa: BLE001 - no reply (timeout, no responders, connection down)
                code = "epp.query:no_reply"
                await self._cleanup(rid, "free")  # booked or not, we cannot tell: free it
                return
            try:
                code = await self._generate(rid, tokens, reply)
            finally:
                await self._cleanup(rid, "free")
        finally:
            self.inflight -= 1
            self.outcomes.append(Outcome(start, time.monotonic(), code))

    async def _generate(self, rid: str, tokens: list[int], reply: EppQueryReply) -> str:
        gen = GenerateRequest(request_id=rid, token_ids=tokens, max_tokens=self._rng.randint(4, 24), dp_rank=reply.decode.dp_rank)
        inbox, queue = await self._client.open(NAMES.generate(self.pool, reply.decode.worker_id), gen)
        try:
            async with asyncio.timeout(self.generate_timeout_s):
                while True:
                    item = await queue.get()
                    if isinstance(item, Exception):
                        code = f"generate:{getattr(item, 'code', 'invalid_reply')}"
                        self.examples.setdefault(code, str(item))
                        return code
                    if isinstance(item, GenerateFirstToken):
                        await self._cleanup(rid, "prefill_complete")
                    elif isinstance(item, GenerateDone):
                        return "ok"
        except TimeoutError:
            return "generate:timeout"
        finally:
            self._client.close(inbox)

    async def _cleanup(self, rid: str, phase: str) -> None:
        deadline = time.monotonic() + self.cleanup_deadline_s
        delay = 0.1
        while True:
            try:
                await request(self.nc, NAMES.epp_cleanup(self.pool), CleanupRequest(request_id=rid, phase=phase), CleanupReply,  # type: ignore[arg-type]
                              timeout=self.rpc_timeout_s)
                return
            except RemoteError as exc:
                if exc.code != "timeout":  # the bridge answered something final
                    self.cleanup_failures += 1
                    return
            except Exception:  # noqa: BLE001 - no reply: retried
                pass
            if time.monotonic() + delay > deadline:
                self.cleanup_failures += 1
                return
            self.cleanup_retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def errors(self, since: float = float("-inf"), until: float = float("inf")) -> dict[str, int]:
        """Outcomes other than ok of the requests that were in flight at some point in [since, until]."""
        return dict(Counter(o.code for o in self.outcomes if o.code != "ok" and o.end >= since and o.start <= until))

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.code for o in self.outcomes))


@dataclass
class ProbePublisher:
    """KV events of one registered worker, each message retried until acknowledged; `acked` is what
    JetStream accepted: (stream sequence, Nats-Msg-Id)."""

    nc: NATS
    pool: str
    worker_id: int = 9_000
    rate: float = 20.0
    retry_deadline_s: float = 60.0
    acked: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0  # acks that said "already stored" (a retry of a message whose first ack was lost)
    retries: int = 0
    given_up: int = 0

    async def register(self) -> None:
        rec = WorkerRecord(worker_id=self.worker_id, pool=self.pool, pod_name="probe", address="127.0.0.1", port=1,
                           block_size=16, total_kv_blocks=1 << 20, ttl_s=3600, heartbeat_ms=now_ms())
        await put_worker(self.nc, NAMES.workers_bucket, rec)

    async def run(self, stop: asyncio.Event) -> None:
        js = self.nc.jetstream()
        subject = NAMES.kv_subject(self.pool, self.worker_id, 0)
        base = self.worker_id * 10**9
        eid = 0
        stored: list[int] = []
        while not stop.is_set():
            # Mostly one new block; every 8th message removes the block stored 5 messages earlier,
            # so the probe's part of the index stays small however long the run.
            if eid % 8 == 7 and len(stored) > 5:
                ev = removed_event(self.worker_id, eid, [stored.pop(-5)])
            else:
                block = base + eid
                ev = stored_event(self.worker_id, eid, [(block, eid & 0xFFFFFFFF)])
                stored.append(block)
            msg_id = kv_msg_id(self.pool, self.worker_id, 0, eid)
            data = codec.encode_json(ev)
            deadline = time.monotonic() + self.retry_deadline_s
            while True:
                try:
                    ack = await js.publish(subject, data, timeout=2.0, headers={"Nats-Msg-Id": msg_id})
                    self.acked.append((ack.seq, msg_id))
                    self.duplicates += bool(ack.duplicate)
                    break
                except Exception:  # noqa: BLE001 - no ack (server down, leader moving): same message again
                    if time.monotonic() > deadline:
                        self.given_up += 1
                        break
                    self.retries += 1
                    await asyncio.sleep(0.2)
            eid += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / self.rate)
