"""ZMQ intake for one dp rank: SUB to the engine's PUB socket, DEALER to its replay ROUTER socket.

Live frames are `[topic, seq (8-byte big-endian), payload]`. Sequence handling (`SeqTracker`):
in order → apply; forward jump → replay from the first missing seq; backwards → engine restart
(`cleared`, then replay the new publisher from 0 if it is already past 0). A replay that cannot fill
the whole gap (too old for the engine's buffer, timeout, no replay endpoint) publishes `cleared` and
continues with what it has, so the index rebuilds from new events instead of keeping stale blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import zmq
import zmq.asyncio

from services.runtime.logs import get_logger
from services.runtime.tasks import cancel_and_wait

from . import metrics
from .seqtrack import SeqTracker, SeqVerdict

log = get_logger("kvr.relay.ingest")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
# Frames taken back to back before the intake yields to the event loop (the publisher) once.
YIELD_EVERY = 16

ApplyFn = Callable[[int, int, bytes, str], None]  # (dp_rank, seq, payload, source)
ClearFn = Callable[[int, str], None]  # (dp_rank, cause)


def rank_endpoints(endpoints: list[str], dp_start_rank: int, dp_size: int) -> dict[int, str]:
    """One endpoint per rank: an explicit list maps in order; a single base endpoint gives rank r
    the port base + r (vLLM's per-rank port offset)."""
    ranks = list(range(dp_start_rank, dp_start_rank + dp_size))
    if not endpoints:
        return {}
    if len(endpoints) == len(ranks):
        return dict(zip(ranks, endpoints, strict=True))
    if len(endpoints) != 1:
        raise ValueError(f"{len(endpoints)} endpoints for {len(ranks)} dp ranks: give one base endpoint or one per rank")
    base = endpoints[0]
    if len(ranks) == 1 and dp_start_rank == 0:
        return {0: base}
    parts = urlsplit(base)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"cannot offset {base!r} per dp rank: give one endpoint per rank")
    host = parts.netloc.rsplit(":", 1)[0]
    return {r: urlunsplit((parts.scheme, f"{host}:{parts.port + r}", "", "", "")) for r in ranks}


def attach(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    # vLLM's rule: wildcard addresses are bound, anything else is connected.
    if "*" in endpoint:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)


def parse_replay_frames(frames: list[bytes]) -> tuple[int, bytes] | None:
    """(seq, payload) of a replay reply in any of vLLM's shapes, seq = -1 for the end marker.

    DEALER receives `[b"", seq, payload]` (before vllm #45177), `[b"", topic, seq, payload]`
    (after), or the same without the empty delimiter."""
    if len(frames) == 4 and frames[0] == b"":
        seq_b, payload = frames[2], frames[3]
    elif len(frames) == 3:
        seq_b, payload = frames[1], frames[2]
    elif len(frames) == 2:
        seq_b, payload = frames[0], frames[1]
    else:
        return None
    if len(seq_b) != 8:
        return None
    if seq_b == END_SEQ:
        return -1, b""
    return int.from_bytes(seq_b, "big"), payload


class RankIntake:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        dp_rank: int,
        endpoint: str,
        replay_endpoint: str | None,
        *,
        topic: str,
        apply: ApplyFn,
        clear: ClearFn,
        clear_on_start: bool = True,
        replay_timeout_s: float = 2.0,
        hwm: int = 100_000,
    ) -> None:
        self.ctx = ctx
        self.dp_rank = dp_rank
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self._apply = apply
        self._clear = clear
        self.clear_on_start = clear_on_start
        self.replay_timeout_s = replay_timeout_s
        self.hwm = hwm
        self.tracker = SeqTracker()
        self.sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.live_batches = 0
        self.replays = 0
        self.label = str(dp_rank)

    def open(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.hwm)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            attach(sub, self.endpoint)  # a malformed endpoint raises ZMQError
        except BaseException:
            sub.close(linger=0)  # an open socket would block the context's term() forever
            raise
        self.sub = sub

    def start(self) -> None:
        if self.sub is None:
            self.open()
        self._task = asyncio.create_task(self._run(), name=f"relay-zmq-{self.dp_rank}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for sock in (self.sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)
        self.sub = self._dealer = None

    async def _run(self) -> None:
        assert self.sub is not None
        burst = 0
        while True:
            # A ready socket answers recv without suspending, so draining a backlog would hold the
            # event loop until the socket is empty and the publisher could not run meanwhile.
            if burst >= YIELD_EVERY:
                burst = 0
                await asyncio.sleep(0)
            frames = await self.sub.recv_multipart()
            burst += 1
            try:
                await self.on_frames(frames)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad batch must never stop the intake
                log.exception("relay.intake_failed", dp_rank=self.dp_rank)

    async def on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            metrics.INVALID.labels("frames").inc()
            return
        _topic, seq_b, payload = frames
        if len(seq_b) != 8:
            metrics.INVALID.labels("seq").inc()
            return
        seq = int.from_bytes(seq_b, "big")
        self.live_batches += 1
        verdict = self.tracker.classify(seq)
        if verdict is SeqVerdict.DUPLICATE:
            metrics.DUPLICATES.labels(self.label).inc()
            return
        if verdict is SeqVerdict.NEXT:
            self._apply_one(seq, payload, "live")
            return
        if verdict is SeqVerdict.FIRST:
            cleared = False
            if self.clear_on_start:
                self._clear(self.dp_rank, "start")
                cleared = True
            if seq > 0 and self.replay_endpoint:
                await self._recover(0, seq, payload, cleared=cleared)
            else:
                self._apply_one(seq, payload, "live")
            return
        if verdict is SeqVerdict.RESTART:
            metrics.ENGINE_RESTARTS.labels(self.label).inc()
            log.warning("relay.engine_restart", dp_rank=self.dp_rank, seq=seq, last=self.tracker.last)
            self.tracker.reset()
            self._clear(self.dp_rank, "engine_restart")
            if seq > 0 and self.replay_endpoint:
                await self._recover(0, seq, payload, cleared=True)
            else:
                self._apply_one(seq, payload, "live")
            return
        # GAP
        assert self.tracker.last is not None
        metrics.SEQ_GAPS.labels(self.label).inc()
        log.info("relay.seq_gap", dp_rank=self.dp_rank, last=self.tracker.last, seq=seq)
        await self._recover(self.tracker.last + 1, seq, payload, cleared=False)

    def _apply_one(self, seq: int, payload: bytes, source: str) -> None:
        self.tracker.applied(seq)
        metrics.ZMQ_BATCHES.labels(self.label, source).inc()
        self._apply(self.dp_rank, seq, payload, source)

    def _unrecoverable(self, cleared: bool, why: str) -> bool:
        if not cleared:
            metrics.UNRECOVERABLE_GAPS.labels(self.label).inc()
            log.warning("relay.gap_unrecoverable", dp_rank=self.dp_rank, why=why)
            self._clear(self.dp_rank, "unrecoverable_gap")
        return True

    async def _recover(self, start: int, trigger_seq: int, trigger_payload: bytes, *, cleared: bool) -> None:
        """Fill [start, trigger_seq) from the replay socket, then apply the live trigger batch."""
        expected = start
        if not self.replay_endpoint:
            cleared = self._unrecoverable(cleared, "no replay endpoint")
        else:
            metrics.REPLAY_REQUESTS.labels(self.label).inc()
            self.replays += 1
            replayed = await self._fetch_replay(start)
            if replayed is None:
                cleared = self._unrecoverable(cleared, "replay timed out")
            for i, (seq, payload) in enumerate(replayed or ()):
                if seq < expected:
                    continue  # before what we asked for (or already applied)
                if seq > expected:
                    cleared = self._unrecoverable(cleared, f"replay starts at {seq}, need {expected}")
                metrics.REPLAYED_BATCHES.labels(self.label).inc()
                self._apply_one(seq, payload, "replay")
                expected = seq + 1
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # a replay of thousands of batches: let the publisher run
        if trigger_seq >= expected:
            if trigger_seq > expected:
                cleared = self._unrecoverable(cleared, f"replay ended at {expected - 1}, live is at {trigger_seq}")
            self._apply_one(trigger_seq, trigger_payload, "live")
        else:
            self.tracker.replayed(trigger_seq, expected - 1)

    async def _fetch_replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Every batch the engine still buffers from `start` on; None on timeout / no answer."""
        if self._dealer is None:
            dealer = self.ctx.socket(zmq.DEALER)
            try:
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(self.replay_endpoint)  # type: ignore[arg-type]
            except BaseException:
                dealer.close(linger=0)
                raise
            self._dealer = dealer
        dealer = self._dealer
        # REQ-style envelope: vLLM's ROUTER expects [identity, b"", start_seq].
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out: list[tuple[int, bytes]] = []
        while True:
            if not await dealer.poll(int(self.replay_timeout_s * 1000)):
                # Replies to this request may still arrive later: a fresh socket cannot see them.
                dealer.close(linger=0)
                self._dealer = None
                return None
            frames = await dealer.recv_multipart()
            parsed = parse_replay_frames(frames)
            if parsed is None:
                metrics.INVALID.labels("replay_frames").inc()
                continue
            seq, payload = parsed
            if seq == -1:
                return out
            out.append((seq, payload))
