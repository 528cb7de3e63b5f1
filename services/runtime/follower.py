"""Follow a JetStream stream in order from a given sequence, forever, surviving reconnects.

Each follower owns a non-durable pull consumer (ack none, in memory). Every message is handed to a
synchronous `apply(seq, subject, data, headers)` callback in stream order; the follower remembers the
last applied sequence and, after any error (server restart, consumer lost), recreates the consumer
at `applied + 1`, so nothing is skipped and nothing is applied twice.

Pulls are bounded in bytes as well as messages: one pull request at a time asks for at most `batch`
messages *and* `max_bytes` bytes (JetStream's `max_bytes` pull option), so however large the backlog
and its messages, at most one pull's worth is ever on its way to this process and nats-server never
sees it as a slow consumer. (nats-py's `fetch` has no byte limit: a fetch of 1,024 messages of
≈ 0.5 MB each got the indexer disconnected.) Messages are applied as they arrive, not when the pull
completes, so a quiet stream's next message is applied within a round trip.

`caught_up` comes from the server's own account (see `progress.FollowerProgress`), never from a pull
that timed out; `ready()` adds "connected to NATS" and "not lagging beyond `max_lag_s`". Every
`poll_interval_s` the follower reads consumer and stream info: the server's pending count (so lag
is known even while paused or stuck) and the stream's first sequence — if the stream has dropped
messages the follower had not read yet (`max_age`, `max_bytes`, a purge), that is counted and
reported through `on_history_lost`, never skipped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .badinput import RateLimitedLog
from .logs import get_logger
from .progress import FollowerProgress, lost_sequences
from .tasks import cancel_and_wait

log = get_logger("kvr.follower")

ApplyFn = Callable[[int, str, bytes, dict[str, str] | None], None]

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
# A pull must be able to carry the largest message the server accepts, or that message would never
# be delivered: the budget is at least max_payload plus room for subject, reply and headers.
MESSAGE_OVERHEAD = 64 * 1024
MAX_BUDGET = 64 * 1024 * 1024

RESETS = Counter("kvr_follower_resets_total", "Consumers recreated after an error, by follower", ["follower"])
HISTORY_LOST = Counter(
    "kvr_follower_history_lost_total",
    "Stream sequences a follower still needed that the stream had already dropped (max_age, max_bytes, purge)",
    ["follower"],
)
APPLY_FAILURES = Counter("kvr_follower_apply_failures_total", "Messages whose apply callback raised (a bug; skipped)", ["follower"])

FOLLOWERS: weakref.WeakSet[Any] = weakref.WeakSet()


class _ConsumerLost(Exception):
    pass


class _Rewind(Exception):
    pass


class _Pull:
    """One outstanding pull request; its replies come to `{inbox}.{n}`, so a late status of an
    earlier request (e.g. "Batch Completed" after the count was reached) cannot end this one."""

    __slots__ = ("n", "batch", "received", "done", "status", "description")

    def __init__(self, n: int, batch: int) -> None:
        self.n = n
        self.batch = batch
        self.received = 0
        self.done = asyncio.Event()
        self.status = ""
        self.description = ""

    def finish(self, status: str = "", description: str = "") -> None:
        if not self.done.is_set():
            self.status, self.description = status, description
            self.done.set()


def parse_ack_reply(reply: str) -> tuple[int, int, int] | None:
    """(stream seq, pending, stored ns) from a JetStream delivery's reply subject, v1 or v2 form."""
    tokens = reply.split(".")
    n = len(tokens)
    if n == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        base = 5
    elif n >= 11:  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
        base = 7
    else:
        return None
    try:
        return int(tokens[base]), int(tokens[base + 3]), int(tokens[base + 2])
    except ValueError:
        return None


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
        max_bytes: int = DEFAULT_MAX_BYTES,
        expires_s: float = 2.0,
        poll_interval_s: float = 1.0,
        max_lag_s: float = 0.0,
        name: str = "follower",
        track_history: bool = True,
        on_history_lost: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.filter_subjects = filter_subjects
        self._apply = apply
        self.next_seq = max(1, start_seq)
        self.applied_seq = self.next_seq - 1
        self.first_delivered_seq: int | None = None
        self.batch = max(1, batch)
        self.max_bytes = max(1024, max_bytes)
        self.expires_s = expires_s
        self.poll_interval_s = poll_interval_s
        self.max_lag_s = max_lag_s
        self.name = name
        # A follower starting from 1 wants whatever the stream holds; one starting later (after a
        # snapshot) needs everything from there. KV buckets (history 1) drop superseded revisions by
        # design: their watchers pass track_history=False.
        self._track_history = track_history
        self._on_history_lost = on_history_lost
        self._from_scratch = self.next_seq <= 1
        self._polled = False
        # After a stall we control (pause, consumer recreated) the stream is checked before the next
        # pull, so messages it dropped meanwhile are reported even if the stall was short.
        self._poll_due = False
        self._clock = clock
        self.progress = FollowerProgress(clock())
        self.caught_up = asyncio.Event()
        self.resets = 0
        self.history_lost = 0
        self.apply_failures = 0
        self.last_error: str | None = None
        self.stream_first_seq = 0
        self.stream_last_seq = 0
        self._covered_seq = 0  # the server said nothing of the filter up to here is pending
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._running = asyncio.Event()  # cleared by pause(): no new pulls; arriving messages wait
        self._running.set()
        self._held: deque[tuple[int, int, int, str, bytes, dict[str, str] | None]] = deque()
        self._consumer: str | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._generation = 0
        self._pull: _Pull | None = None
        self._rewind_to: int | None = None
        self._replay_until = 0  # messages up to here are being re-read on purpose (rewind)
        self._last_yield = time.perf_counter()
        self._budget = self.max_bytes
        self._errors = RateLimitedLog(30.0)
        self._resets_metric = RESETS.labels(name)
        self._lost_metric = HISTORY_LOST.labels(name)
        self._failures_metric = APPLY_FAILURES.labels(name)
        FOLLOWERS.add(self)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.stream}")
        self._watch_task = asyncio.create_task(self._watch(), name=f"follow-watch-{self.stream}")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._watch_task)
        await cancel_and_wait(self._task)
        await self._close()

    def pause(self) -> None:
        """Apply nothing until `resume()` (e.g. while the state is serialised in pieces)."""
        self._running.clear()

    def resume(self) -> None:
        """Apply what arrived while paused (synchronously, in order), then pull again."""
        if self._rewind_to is not None:
            self._held.clear()  # re-read anyway, after the messages before them
        while self._held:
            self._deliver(*self._held.popleft())
        self._poll_due = True
        self._running.set()

    def rewind(self, seq: int) -> None:
        """Re-read the stream from `seq`: the consumer is recreated there and every message from `seq`
        on is handed to `apply` again, in order (the caller decides what to do with the ones it has
        already applied). Messages up to the current position do not count for lag."""
        if seq >= self.next_seq and self._rewind_to is None:
            return
        self._rewind_to = seq if self._rewind_to is None else min(self._rewind_to, seq)
        self._replay_until = max(self._replay_until, self.applied_seq)
        if self._pull is not None:
            self._pull.finish("rewind")

    @property
    def replaying(self) -> bool:
        return self._rewind_to is not None or self.applied_seq < self._replay_until

    # ---- readiness ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self.progress.pending or 0

    def lag_s(self) -> float:
        return self.progress.lag_s(self._clock())

    def ready(self) -> bool:
        """Caught up (server's account), connected, and not lagging beyond `max_lag_s`."""
        return self.caught_up.is_set() and self._nc.is_connected and self.progress.ready(self._clock(), self.max_lag_s)

    def state(self) -> dict[str, Any]:
        return {
            "applied_seq": self.applied_seq,
            "pending": self.progress.pending,
            "lag_s": round(self.lag_s(), 3),
            "caught_up": self.caught_up.is_set(),
            "connected": self._nc.is_connected,
            "resets": self.resets,
            "history_lost": self.history_lost,
            "apply_failures": self.apply_failures,
        }

    # ---- consumer -----------------------------------------------------------------------------

    def _config(self) -> ConsumerConfig:
        # Named, so nats-py puts the name and a single filter in the API subject
        # (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): what a least-privilege NATS user's
        # permissions can pin to the pools it serves (services/runtime/permissions.py).
        cfg = ConsumerConfig(
            name=secrets.token_hex(11),
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

    async def _open(self) -> None:
        info = await self._js.add_consumer(self.stream, self._config())
        self._consumer = info.name
        self._generation += 1
        generation = self._generation

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation:
                await self._on_msg(msg)

        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=on_msg, pending_msgs_limit=0, pending_bytes_limit=0)
        self._budget = max(self.max_bytes, (self._nc.max_payload or 0) + MESSAGE_OVERHEAD)
        self._poll_due = True
        if info.num_pending == 0:  # nothing of the filter from next_seq on: caught up right away
            self._server_account(info.num_pending, info.delivered.stream_seq if info.delivered else 0)

    async def _close(self) -> None:
        self._generation += 1  # whatever the old inbox still delivers is ignored
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if consumer is not None and not self._nc.is_closed and self._nc.is_connected:
            with contextlib.suppress(Exception):  # it would expire after its inactive threshold anyway
                await asyncio.wait_for(self._js.delete_consumer(self.stream, consumer), 1.0)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                if self._rewind_to is not None:
                    self._held.clear()
                    self.next_seq = self._rewind_to
                    self.applied_seq = self.next_seq - 1
                    self._rewind_to = None
                await self._open()
                backoff = 0.1
                await self._pump()
            except asyncio.CancelledError:
                raise
            except _Rewind:
                log.info("follower.rewind", stream=self.stream, name=self.name, from_seq=self._rewind_to)
            except Exception as exc:  # noqa: BLE001 - any failure: recreate the consumer where we left off
                if self._nc.is_closed:
                    log.info("follower.connection_closed", stream=self.stream, name=self.name)
                    return
                self.resets += 1
                self._resets_metric.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("follower.reset", stream=self.stream, name=self.name, resume_seq=self.next_seq, error=self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self._pull = None
                await self._close()

    async def _pump(self) -> None:
        prefix = getattr(self._js, "_prefix", "$JS.API")
        subject = f"{prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self._consumer}"
        expires_ns = int(self.expires_s * 1e9)
        n = 0
        while not self._stopping:
            await self._running.wait()
            if self._rewind_to is not None:
                raise _Rewind
            if self._poll_due:
                self._poll_due = False
                with contextlib.suppress(Exception):
                    await self._poll()
            n += 1
            pull = self._pull = _Pull(n, self.batch)
            request = json.dumps({"batch": self.batch, "max_bytes": self._budget, "expires": expires_ns}).encode()
            await self._nc.publish(subject, request, reply=f"{self._inbox}.{n}")
            try:
                await asyncio.wait_for(pull.done.wait(), self.expires_s + 2.0)
            except TimeoutError:
                raise _ConsumerLost("no answer to a pull request") from None
            status = pull.status
            if status == "rewind":
                raise _Rewind
            if status in ("", "404", "408"):
                if not self.caught_up.is_set() and status:
                    await self._poll()  # idle and not caught up yet: ask the server (e.g. all filtered out)
                continue
            if status == "409":
                desc = pull.description.lower()
                if "maxbytes" in desc or "max bytes" in desc:
                    if pull.received == 0 and self._budget < MAX_BUDGET:
                        self._budget = min(MAX_BUDGET, self._budget * 2)
                        log.warning("follower.pull_budget_raised", stream=self.stream, name=self.name, max_bytes=self._budget)
                    continue
                if "batch completed" in desc:
                    continue
                if "maxwaiting" in desc or "max waiting" in desc:
                    await asyncio.sleep(0.05)
                    continue
            raise _ConsumerLost(f"pull ended with {status} {pull.description}".strip())

    async def _on_msg(self, msg: Msg) -> None:
        pull = self._pull
        reply = msg.reply
        if not reply.startswith("$JS.ACK."):
            headers = msg.headers or {}
            status = headers.get("Status", "")
            if status == "100":  # idle heartbeat
                return
            if pull is not None and msg.subject == f"{self._inbox}.{pull.n}":
                pull.finish(status or "?", headers.get("Description", ""))
            return
        meta = parse_ack_reply(reply)
        if meta is None:
            return
        seq, num_pending, stored_ns = meta
        if self._running.is_set() and not self._held:
            self._deliver(seq, num_pending, stored_ns, msg.subject, msg.data, msg.headers)
        else:
            self._held.append((seq, num_pending, stored_ns, msg.subject, msg.data, msg.headers))
        if pull is not None:
            pull.received += 1
            if pull.received >= pull.batch:
                pull.finish()
        now = time.perf_counter()
        if now - self._last_yield > 0.005:  # a backlog of large messages must not starve the loop
            await asyncio.sleep(0)
            self._last_yield = time.perf_counter()

    def _deliver(self, seq: int, num_pending: int, stored_ns: int, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        if seq < self.next_seq:
            return  # redelivery after a reset
        if self.first_delivered_seq is None:
            self.first_delivered_seq = seq
        try:
            self._apply(seq, subject, data, headers)
        except Exception:  # a poison message must never stall the stream
            self.apply_failures += 1
            self._failures_metric.inc()
            if self._errors.allow(("apply", self.name)) is not None:
                log.exception("follower.apply_failed", stream=self.stream, name=self.name, seq=seq)
        self.applied_seq = seq
        self.next_seq = seq + 1
        self.progress.applied(num_pending, stored_ns / 1e9, self._clock(), replayed=seq <= self._replay_until)
        if self.progress.caught_up and not self.caught_up.is_set():
            self.caught_up.set()

    # ---- the server's account -----------------------------------------------------------------

    def _server_account(self, num_pending: int, delivered_seq: int) -> None:
        self.progress.server_account(num_pending, delivered_seq, self.applied_seq, self._clock(), unapplied=len(self._held))
        if self.progress.caught_up and not self.caught_up.is_set():
            self.caught_up.set()

    async def _poll(self) -> None:
        """Stream first/last sequence (history loss, covered position), then the consumer's pending."""
        consumer = self._consumer
        sinfo = await self._js.stream_info(self.stream)
        first, last = sinfo.state.first_seq, sinfo.state.last_seq
        self.stream_first_seq, self.stream_last_seq = first, last
        if not self._polled:
            self._polled = True
            if self._from_scratch:
                self._covered_seq = max(self._covered_seq, first - 1)
        needed_from = max(self.next_seq, self._covered_seq + 1)
        lost = lost_sequences(first, needed_from) if self._track_history else 0
        if lost:
            self.history_lost += lost
            self._lost_metric.inc(lost)
            self._covered_seq = max(self._covered_seq, first - 1)
            log.error(
                "follower.history_lost", stream=self.stream, name=self.name, missing_from=needed_from, missing=lost,
                stream_first_seq=first, hint="the stream dropped messages before this follower read them (max_age, max_bytes or a purge)",
            )
            if self._on_history_lost is not None:
                self._on_history_lost(needed_from, lost)
        if consumer is None or consumer != self._consumer:
            return
        cinfo = await self._js.consumer_info(self.stream, consumer)
        if consumer != self._consumer:
            return
        delivered = cinfo.delivered.stream_seq if cinfo.delivered else 0
        self._server_account(cinfo.num_pending or 0, delivered)
        if cinfo.num_pending == 0 and delivered <= self.applied_seq and not self._held:
            self._covered_seq = max(self._covered_seq, last)

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_interval_s)
            if self._consumer is None or not self._nc.is_connected:
                continue
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - transient; the pump reports real trouble
                log.debug("follower.poll_failed", stream=self.stream, name=self.name, error=str(exc))


class FollowerCollector(Collector):
    """Gauges of every live follower (push and pull), read at scrape time."""

    def collect(self) -> Iterator[Any]:
        applied = GaugeMetricFamily("kvr_follower_applied_seq", "Last stream sequence applied", labels=["follower", "stream"])
        pending = GaugeMetricFamily(
            "kvr_follower_pending", "Messages of the filter not applied yet (server's account)", labels=["follower", "stream"]
        )
        lag = GaugeMetricFamily(
            "kvr_follower_lag_seconds", "How stale the follower's state is (0 when nothing is pending)", labels=["follower", "stream"]
        )
        ready = GaugeMetricFamily(
            "kvr_follower_ready", "1 when caught up, connected and within --max-ready-lag-s", labels=["follower", "stream"]
        )
        for f in list(FOLLOWERS):
            labels = [f.name, f.stream]
            applied.add_metric(labels, f.applied_seq)
            pending.add_metric(labels, f.pending)
            lag.add_metric(labels, f.lag_s())
            ready.add_metric(labels, 1.0 if f.ready() else 0.0)
        yield from (applied, pending, lag, ready)


REGISTRY.register(FollowerCollector())
