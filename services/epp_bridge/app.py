"""The EPP bridge adapter: epp.query / epp.cleanup responders in front of the scheduler.

Query = size check → parse body → tokens (nvext.token_data, token-id prompt, or the pool's tokenizer)
→ pods ∩ discovery → scheduler.select (book as asked) → reply with routing headers. Every check runs
before the scheduler is called, so a rejected query books nothing. The one failure that can follow a
booking is a select deadline passing while the scheduler still books (or books later); the bridge
names each select's booking (`booking_id`) and then frees that booking in the background: in the
bookings stream that free also cancels it, so the late select books nothing whenever it comes.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import codec
from schemas.api import (
    CleanupReply,
    CleanupRequest,
    EppBookRequest,
    EppQueryReply,
    EppQueryRequest,
    ErrorCode,
    Policy,
    SelectReply,
    SelectRequest,
)
from schemas.bookings import new_booking_id
from schemas.codec import RemoteError
from schemas.discovery import WorkerRecord
from schemas.openai import EppQueryTyped, OpenAiBody
from services.runtime.logs import get_logger
from services.runtime.responder import ServiceError, error_for, serve, unsubscribe_all
from services.runtime.service import Runtime
from services.runtime.tracing import span
from services.runtime.workers import WorkerWatcher

from . import metrics
from .decision import (
    NO_PROMPT,
    Pins,
    RouteAsk,
    Routed,
    query_reply,
    request_pins,
    select_request,
    with_offered,
)
from .extproc import ExtProcServer
from .labels import LabelFilter, parse_label_filters
from .link import (
    EmbeddedSchedulerLink,
    NatsSchedulerLink,
    NoScheduler,
    SchedulerLink,
)
from .pods import PodIndex
from .prompt import needs_tokenizer, parse_body, prompt_tokens
from .settings import EppBridgeConfig
from .tokenizer import PoolTokenizer, parse_tokenizer_dirs

log = get_logger("kvr.epp_bridge")

QUEUE = "epp_bridge"
# Attempts of the background free after a select timeout (retried only while the scheduler cannot
# be reached: one answered free settles it, see _free_late_booking).
COMPENSATION_DELAYS_S = (0.0, 0.5, 2.0)
# Attempts of a booking update from an ext_proc stream (prefill_complete, free, move).
UPDATE_RETRY_DELAYS_S = (0.0, 0.2, 1.0)


class EppBridgeApp:
    def __init__(self, cfg: EppBridgeConfig) -> None:
        self.cfg = cfg
        self.max_body_bytes: int = cfg.epp_max_body_bytes
        self.max_prompt_tokens: int = cfg.epp_max_prompt_tokens
        self.select_timeout_s: float = cfg.epp_select_timeout_s
        self.cleanup_timeout_s: float = cfg.epp_cleanup_timeout_s
        self.tokenizers: dict[str, PoolTokenizer] = {}
        self.watcher: WorkerWatcher | None = None
        self._indexes: dict[str, PodIndex] = {}
        self._identities: dict[tuple[str, int], tuple[object, ...]] = {}
        self._subs: list[Subscription] = []
        self._background: set[asyncio.Task[None]] = set()
        self._rt: Runtime | None = None
        self._embedded: EmbeddedSchedulerLink | None = None
        threads = cfg.epp_tokenize_threads
        self._tokenize_pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize") if threads > 0 else None
        self.link: SchedulerLink | None = None
        self._ready = False
        self.label_filters: dict[str, list[LabelFilter]] = {}
        self.extproc: ExtProcServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self.label_filters = parse_label_filters(list(self.cfg.epp_label_filter), rt.pools)
        if self.cfg.grpc_port > 0:
            # Up first, so gateways' health checks get NOT_SERVING (not a refused connection) while
            # discovery catches up.
            self.extproc = ExtProcServer(self, self.cfg, rt.pools)
            port = await self.extproc.start()
            log.info("grpc.listening", port=port, pool=self.extproc.pool, tls=self.extproc.tls_mode)
        for pool, directory in parse_tokenizer_dirs(self.cfg.epp_tokenizer_dir, rt.pools).items():
            if pool in rt.pools:
                self.tokenizers[pool] = PoolTokenizer.load(directory, self.cfg.epp_chat_content_format)
                log.info("tokenizer.loaded", pool=pool, directory=directory, chat_template=self.tokenizers[pool].template is not None)
        # The process's one discovery watcher: in the one-process mode the embedded scheduler and its
        # index replica listen to it too (every listener first, then it starts).
        self.watcher = rt.discovery()
        self.watcher.listen(self._on_worker_put, self._on_worker_remove)
        if self.cfg.epp_embedded_scheduler:
            self._embedded = EmbeddedSchedulerLink(self.cfg.scheduler)
            await self._embedded.start(rt)
            self.link = self._embedded
        else:
            self.link = NatsSchedulerLink(rt)
        self.watcher.start()
        inline = self._answers_inline if self._embedded is not None else None
        for pool in rt.pools:
            endpoints: list[tuple[str, Any, Any, str, Any]] = [
                (rt.names.epp_query(pool), EppQueryTyped, self._query_handler(pool), "epp.query", inline),
                (rt.names.epp_book(pool), EppBookRequest, self._book_handler(pool), "epp.book", None),
                (rt.names.epp_cleanup(pool), CleanupRequest, self._cleanup_handler(pool), "epp.cleanup", None),
            ]
            for subject, request_type, handler, endpoint, answers_inline in endpoints:
                self._subs.append(
                    await serve(
                        rt.nc, subject, request_type, handler, queue=QUEUE, endpoint=endpoint,
                        max_inflight=self.cfg.epp_max_inflight, inline=answers_inline,
                    )
                )
        await asyncio.wait_for(self.watcher.caught_up.wait(), 60)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        if self.extproc is not None:
            await self.extproc.stop()
        await unsubscribe_all(self._subs)
        if self._background:
            await asyncio.wait(self._background, timeout=3)
        if self.watcher:
            await self.watcher.stop()
        if self._embedded:
            await self._embedded.stop()
        if self._tokenize_pool is not None:
            self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def stop_timeout_s(self) -> float:
        """run_app's bound on `stop()`: the ext_proc drain plus the usual 10 s."""
        return 10.0 + (self.cfg.grpc_drain_s if self.extproc is not None else 0.0)

    def ready(self) -> bool:
        # connected, and the discovery follower caught up and not lagging (--max-ready-lag-s)
        connected = self._rt is not None and self._rt.nc.is_connected
        watching = self.watcher is not None and self.watcher.ready()
        return self._ready and connected and watching and (self._embedded is None or self._embedded.ready())

    def _answers_inline(self, req: EppQueryRequest) -> bool:
        """One-process mode: a query that will not suspend (no tokenizer thread, no booking, overlap
        in this process) is answered in the subscription's task (see `serve`)."""
        assert self._embedded is not None
        return self._tokenize_pool is None and self._embedded.decides_inline(req.book)

    def status(self) -> dict[str, Any]:
        directory = self.watcher.directory if self.watcher else None
        return {
            "pools": list(self._rt.pools) if self._rt else [],
            "tokenizers": {pool: str(t.directory) for pool, t in self.tokenizers.items()},
            "workers": {pool: len(directory.live(pool)) for pool in (self._rt.pools if self._rt else [])} if directory else {},
            "pending_compensations": len(self._background),
            "scheduler": "embedded" if self._embedded else "nats",
            "ext_proc": self.extproc.status() if self.extproc else None,
        }

    # --- discovery -------------------------------------------------------------------------------

    def _on_worker_put(self, record: WorkerRecord, _is_new: bool) -> None:
        # Heartbeats re-put unchanged records every ttl/3: rebuild the pod index only when what it
        # is built from changes.
        identity = (record.pod_name, record.address, record.port, record.dp_start_rank, record.dp_size,
                    tuple(record.dp_ports or ()), tuple(record.taints), tuple(sorted(record.labels.items())))
        key = (record.pool, record.worker_id)
        if self._identities.get(key) != identity:
            self._identities[key] = identity
            self._indexes.pop(record.pool, None)

    def _on_worker_remove(self, pool: str, worker_id: int) -> None:
        self._identities.pop((pool, worker_id), None)
        self._indexes.pop(pool, None)

    def pod_index(self, pool: str) -> PodIndex:
        index = self._indexes.get(pool)
        if index is None:
            assert self.watcher is not None
            index = PodIndex(self.watcher.directory.live(pool), self.label_filters.get(pool, ()))
            self._indexes[pool] = index
        return index

    # --- epp.query -------------------------------------------------------------------------------

    def _query_handler(self, pool: str):
        async def handle(req: EppQueryRequest, msg: Msg) -> EppQueryReply:
            # serve() has decoded the payload already; NATS' max_payload (1 MiB by default) bounds that
            # work, and the configured limit is enforced here, before anything else happens.
            started = time.perf_counter()
            routed, outcome = "none", "ok"
            try:
                if len(msg.data) > self.max_body_bytes:
                    raise ServiceError(
                        ErrorCode.INVALID_REQUEST, f"request is {len(msg.data)} bytes, more than the limit of {self.max_body_bytes}", "$"
                    )
                reply = await self.query(pool, req, msg)
                routed = reply.mode
                return reply
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                outcome = _code_of(exc)
                raise
            finally:
                metrics.query_counter(outcome, req.mode, routed).inc()
                metrics.PHASE_TOTAL.observe(time.perf_counter() - started)

        return handle

    def _book_handler(self, pool: str):
        async def handle(req: EppBookRequest, msg: Msg) -> EppQueryReply:
            routed, outcome = "none", "ok"
            try:
                if len(msg.data) > self.max_body_bytes:
                    raise ServiceError(
                        ErrorCode.INVALID_REQUEST, f"request is {len(msg.data)} bytes, more than the limit of {self.max_body_bytes}", "$"
                    )
                reply = await self.book(pool, req)
                routed = reply.mode
                return reply
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                outcome = _code_of(exc)
                raise
            finally:
                metrics.BOOKS.labels(outcome, routed).inc()

        return handle

    async def query(self, pool: str, req: EppQueryRequest, msg: Msg | None = None) -> EppQueryReply:
        """`req` as sent (body a dict) or as `EppQueryTyped` with the message it was decoded from."""
        t0 = time.perf_counter()
        body = req.body if isinstance(req.body, OpenAiBody) else parse_body(req.body)
        metrics.PHASE_PARSE.observe(time.perf_counter() - t0)
        ask = RouteAsk(req.request_id, body, lambda: _raw_body(req, msg), pods=req.pods, mode=req.mode, book=req.book,
                       policy=req.policy, headers=req.headers)
        routed = await self.route(pool, ask)
        return query_reply(req, routed.reply, routed.prompt)

    async def book(self, pool: str, req: EppBookRequest) -> EppQueryReply:
        """epp.book: book targets chosen elsewhere, through the one decision path with both legs
        pinned (same eligibility checks; a failure books nothing)."""
        body = parse_body(req.body)
        pins = Pins(req.decode.worker_id, req.decode.dp_rank, req.prefill.worker_id if req.prefill else None,
                    req.prefill.dp_rank if req.prefill else None)
        ask = RouteAsk(req.request_id, body, lambda: req.body, pods=req.pods, book=True, headers=req.headers, pins=pins,
                       booking_id=req.booking_id or "")
        routed = await self.route(pool, ask)
        return query_reply(req, routed.reply, routed.prompt)

    async def route(self, pool: str, ask: RouteAsk) -> Routed:
        """The one decision path of both entry points (epp.query and ext_proc): tokens → label
        filter, pods or endpoint subset → required-taints pre-check → scheduler.select."""
        t1 = time.perf_counter()
        body = ask.body
        tokenizer = self.tokenizers.get(pool)
        if body is None:
            prompt = NO_PROMPT
        elif needs_tokenizer(body) and tokenizer is not None:
            raw = ask.raw() if body.messages is not None and ask.raw is not None else None
            with span("epp.tokenize"):
                if self._tokenize_pool is not None:
                    prompt = await asyncio.get_running_loop().run_in_executor(
                        self._tokenize_pool, prompt_tokens, raw, body, tokenizer, self.max_prompt_tokens
                    )
                else:
                    prompt = prompt_tokens(raw, body, tokenizer, self.max_prompt_tokens)
        else:
            prompt = prompt_tokens(None, body, tokenizer, self.max_prompt_tokens)
        t2 = time.perf_counter()
        if body is not None:
            metrics.PHASE_TOKENIZE.observe(t2 - t1)
            metrics.TOKEN_SOURCE_CHILDREN[prompt.source].inc()
            metrics.PROMPT_TOKENS.observe(prompt.isl_tokens)

        index = self.pod_index(pool)
        offer = index.offer(ask.pods, ask.endpoints)
        targets = offer.targets
        # Without pods or a subset hint, the label filter alone restricts (by worker id).
        allowed = index.allowed(None) if targets is None else None
        if targets is not None and not targets:
            if ask.endpoints is not None:
                raise ServiceError(
                    ErrorCode.NO_WORKERS, f"none of the {len(ask.endpoints)} endpoints of the subset hint is an eligible worker of pool {pool!r}"
                )
            raise ServiceError(ErrorCode.NO_WORKERS, f"none of the {len(ask.pods or ())} candidate pods is a known worker of pool {pool!r}")
        if allowed is not None and not allowed:
            raise ServiceError(ErrorCode.NO_WORKERS, f"no worker of pool {pool!r} passes the pool's label filter")
        nvext = body.nvext if body is not None else None
        constraints = nvext.routing_constraints if nvext else None
        if constraints and constraints.required_taints:
            candidates: list[int] = sorted({t[0] for t in targets}) if targets is not None else (
                allowed if allowed is not None else list(index.records))
            if candidates and not index.required_taints_met(candidates, constraints.required_taints):
                raise ServiceError(
                    ErrorCode.CONSTRAINTS_UNSATISFIED,
                    f"no candidate worker carries every required taint {sorted(constraints.required_taints)}",
                )
        pins = ask.pins if ask.pins is not None else request_pins(ask.headers, nvext)
        query_only = ask.pins is None and nvext is not None and nvext.query_instance_id

        if body is None:
            # No prompt to match (a request without a body, e.g. GET /v1/models): the least loaded
            # eligible worker, nothing booked.
            sreq = SelectRequest(request_id=ask.request_id, token_ids=[], allowed_worker_ids=allowed, allowed_targets=targets,
                                 pinned_worker_id=pins.worker_id, pinned_dp_rank=pins.dp_rank,
                                 policy=Policy.LEAST_LOADED, book=False, fallbacks=ask.fallbacks)
        else:
            sreq = select_request(ask, body, prompt, allowed, index.block_size, allowed_targets=targets, fallbacks=ask.fallbacks,
                                  pins=pins, book=ask.book and not query_only)
            if ask.pins is not None:
                # epp.book: exactly the chosen legs; disaggregated when a prefill target is given.
                sreq.mode = "disaggregated" if ask.pins.prefill_worker_id is not None else "aggregated"
            sreq.booking_id = (ask.booking_id or None) if sreq.book else None  # None: _select names the booking
        reply = with_offered(await self._select(pool, sreq), offer.endpoints)
        metrics.PHASE_SELECT.observe(time.perf_counter() - t2)
        return Routed(reply, prompt, query_only=query_only)

    async def _select(self, pool: str, sreq: SelectRequest) -> SelectReply:
        assert self.link is not None
        if sreq.book and not sreq.booking_id:
            sreq.booking_id = new_booking_id()
        try:
            return await self.link.select(pool, sreq, self.select_timeout_s)
        except (ServiceError, RemoteError) as exc:
            # Our deadline passed (the scheduler may still book), or the scheduler answered `timeout`
            # because its bookings stream did not acknowledge the add in time (it may have stored it
            # anyway): free exactly this booking. Nobody serving the pool cannot have booked.
            if sreq.book and exc.code == ErrorCode.TIMEOUT and not isinstance(exc, NoScheduler):
                self._compensate(pool, sreq.request_id, sreq.booking_id or "")
            raise

    def _compensate(self, pool: str, request_id: str, booking_id: str) -> None:
        task = asyncio.create_task(self._free_late_booking(pool, request_id, booking_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _free_late_booking(self, pool: str, request_id: str, booking_id: str) -> None:
        """Free exactly this query's booking (never a newer booking of a reused request id). The
        scheduler publishes the free even when the booking is not in the stream yet, and every
        replica then ignores its late add: one answer settles it, whatever the select does later."""
        assert self._rt is not None
        req = CleanupRequest(request_id=request_id, phase="free", booking_id=booking_id)
        for delay in COMPENSATION_DELAYS_S:
            await asyncio.sleep(delay)
            try:
                assert self.link is not None
                reply = await self.link.booking(pool, req, self.cleanup_timeout_s)
            except Exception as exc:  # noqa: BLE001 - retried; the unconfirmed-booking TTL is the backstop
                log.warning("epp.compensating_free_failed", pool=pool, request_id=request_id, error=str(exc))
                metrics.COMPENSATING_FREES.labels("error").inc()
                continue
            metrics.COMPENSATING_FREES.labels("freed" if reply.known else "cancelled").inc()
            log.info("epp.late_booking_freed" if reply.known else "epp.late_booking_cancelled", pool=pool, request_id=request_id)
            return

    # --- epp.cleanup -----------------------------------------------------------------------------

    def _cleanup_handler(self, pool: str):
        async def handle(req: CleanupRequest, _msg: Msg) -> CleanupReply:
            try:
                reply = await self.cleanup(pool, req)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                metrics.CLEANUPS.labels(req.phase, _code_of(exc)).inc()
                raise
            metrics.CLEANUPS.labels(req.phase, "known" if reply.known else "unknown").inc()
            return reply

        return handle

    def booking_updates(self, pool: str, pending: list[CleanupRequest]) -> asyncio.Task[None]:
        """Send one request's queued booking updates in order, in the background, until `pending`
        is empty (the caller may append while this runs). A `prefill_complete` with a `free` already
        queued behind it is skipped: the free releases everything, and a short response would
        otherwise cost the scheduler one more JetStream round trip for nothing."""
        task = asyncio.create_task(self._send_updates(pool, pending))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _send_updates(self, pool: str, pending: list[CleanupRequest]) -> None:
        while pending:
            req = pending.pop(0)
            if req.phase == "prefill_complete" and any(p.phase == "free" for p in pending):
                metrics.EXTPROC_BOOKING_UPDATES.labels(req.phase, "skipped").inc()
                continue
            await self._booking_update(pool, req)

    async def _booking_update(self, pool: str, req: CleanupRequest) -> None:
        outcome: str = ErrorCode.INTERNAL
        for delay in UPDATE_RETRY_DELAYS_S:
            if delay:
                await asyncio.sleep(delay)
            try:
                reply = await self.cleanup(pool, req)
            except Exception as exc:  # noqa: BLE001 - retried; the booking TTL is the backstop
                outcome = _code_of(exc)
                log.warning("epp.booking_update_failed", pool=pool, request_id=req.request_id, phase=req.phase, error=str(exc))
                continue
            metrics.EXTPROC_BOOKING_UPDATES.labels(req.phase, "known" if reply.known else "unknown").inc()
            return
        metrics.EXTPROC_BOOKING_UPDATES.labels(req.phase, outcome).inc()

    async def cleanup(self, pool: str, req: CleanupRequest) -> CleanupReply:
        assert self.link is not None
        reply = await self.link.booking(pool, req, self.cleanup_timeout_s)
        return CleanupReply(request_id=req.request_id, known=reply.known)


def _raw_body(req: EppQueryRequest, msg: Msg | None) -> dict[str, Any]:
    """The body as sent: a chat template gets the messages with every field the client gave."""
    if isinstance(req.body, dict):
        return req.body
    if msg is None:
        raise TypeError("an EppQueryTyped request needs the message it was decoded from")
    return codec.decode(msg.data, EppQueryRequest, codec.content_type_of(msg.headers)).body


def _code_of(exc: BaseException) -> ErrorCode:
    return error_for(exc)[0]


def make_app(cfg: EppBridgeConfig) -> EppBridgeApp:
    return EppBridgeApp(cfg)
