"""Follow a JetStream stream in order from a given sequence, forever, surviving reconnects.

Each follower owns a non-durable pull consumer (ack none, in memory). Every message is handed to a
synchronous `apply(seq, subject, data, headers)` callback in stream order; the follower remembers the
last applied sequence and, after any error (server restart, consumer lost), recreates the consumer
at `applied + 1`, so nothing is skipped and nothing is applied twice. `caught_up` is set once the
consumer reports nothing pending, i.e. the state reflects the stream as it was when we started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .logs import get_logger
from .tasks import cancel_and_wait

log = get_logger("kvr.follower")

ApplyFn = Callable[[int, str, bytes, dict[str, str] | None], None]


class StreamFollower:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        filter_subjects: list[str],
        apply: ApplyFn,
        *,
        start_seq: int = 1,
        batch: int = 1024,
        fetch_timeout: float = 0.5,
        name: str = "follower",
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.filter_subjects = filter_subjects
        self._apply = apply
        self.next_seq = max(1, start_seq)
        self.applied_seq = self.next_seq - 1
        self.first_delivered_seq: int | None = None
        self.pending = 0
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.name = name
        self.caught_up = asyncio.Event()
        self.resets = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_error: str | None = None
        self._running = asyncio.Event()  # cleared by pause(): fetched messages wait, unapplied
        self._running.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.stream}")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._task)

    def pause(self) -> None:
        """Apply nothing until `resume()` (e.g. while the state is serialised in pieces)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def _config(self) -> ConsumerConfig:
        cfg = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
            max_waiting=16,
        )
        if len(self.filter_subjects) == 1:
            cfg.filter_subject = self.filter_subjects[0]
        else:
            cfg.filter_subjects = list(self.filter_subjects)
        return cfg

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            sub = None
            try:
                sub = await self._js.pull_subscribe(
                    self.filter_subjects[0], stream=self.stream, config=self._config(), pending_msgs_limit=-1, pending_bytes_limit=-1
                )
                backoff = 0.1
                await self._pump(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: recreate the consumer where we left off
                if self._nc.is_closed:
                    log.info("follower.connection_closed", stream=self.stream, name=self.name)
                    return
                self.resets += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("follower.reset", stream=self.stream, name=self.name, resume_seq=self.next_seq, error=self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if sub is not None:
                    try:
                        await sub.unsubscribe()
                    except Exception:  # noqa: BLE001
                        pass

    async def _pump(self, sub) -> None:  # type: ignore[no-untyped-def]
        idle_timeouts = 0
        while not self._stopping:
            try:
                msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
                idle_timeouts = 0
            except (NatsTimeoutError, asyncio.TimeoutError):
                # Nothing pending right now: whatever existed when we started has been applied.
                self.pending = 0
                self.caught_up.set()
                idle_timeouts += 1
                if idle_timeouts % 20 == 0 and not self._nc.is_connected:
                    raise ConnectionError("not connected") from None
                continue
            await self._running.wait()
            for msg in msgs:
                md = msg.metadata
                seq = md.sequence.stream
                if seq < self.next_seq:
                    continue  # redelivery after a reset
                if self.first_delivered_seq is None:
                    self.first_delivered_seq = seq
                try:
                    self._apply(seq, msg.subject, msg.data, msg.headers)
                except Exception:  # noqa: BLE001 - a poison message must never stall the stream
                    log.exception("follower.apply_failed", stream=self.stream, seq=seq)
                self.applied_seq = seq
                self.next_seq = seq + 1
                self.pending = md.num_pending
                if md.num_pending == 0:
                    self.caught_up.set()
            await asyncio.sleep(0)
