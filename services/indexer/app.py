"""The indexer service: an index replica (`replica.IndexReplica`: KVR_KV and discovery folded into
one prefix index per pool, snapshots to KVR_SNAPSHOTS) answering `indexer.match` / `indexer.dump`.

Endpoints are subscribed only once the replica has caught up: the queue group never routes a match
to a replica that is still replaying its backlog and would under-report overlaps.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import codec
from schemas.api import DumpReply, DumpRequest, ErrorCode, MatchReply, MatchRequest
from services.runtime.follower import StreamFollower
from services.runtime.responder import Handler, ServiceError, serve, unsubscribe_all
from services.runtime.service import Runtime
from services.runtime.tasks import cancel_and_wait
from services.runtime.workers import WorkerWatcher

from . import metrics as m
from . import snapshot
from .admission import Admission
from .core import PoolState
from .index import OverlapScores, PrefixIndex
from .replica import IndexReplica
from .settings import IndexerConfig

QUEUE = "indexer"


class IndexerApp:
    """One prefix index per served pool (`kvr indexer`): construct with a resolved config,
    `await start(rt)`, then `match()` / `dump()` in process or over NATS."""

    def __init__(self, cfg: IndexerConfig, *, serve_endpoints: bool | None = None) -> None:
        self.cfg = cfg
        self.replica = IndexReplica(cfg)
        self.pools = self.replica.pools
        self.serve_endpoints = cfg.serve_endpoints if serve_endpoints is None else serve_endpoints
        self.lag_interval = cfg.lag_interval_s
        self.rt: Runtime | None = None
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False  # caught up (and, when serving endpoints, subscribed)

    # ---- ServiceApp ---------------------------------------------------------------------------

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        await self.replica.start(rt)
        self._tasks.append(asyncio.create_task(self._serve_once_caught_up(), name="indexer-serve"))
        self._tasks.append(asyncio.create_task(self._lag_loop(), name="indexer-lag"))

    async def stop(self) -> None:
        await unsubscribe_all(self._subs)
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await self.replica.stop()

    def ready(self) -> bool:
        """Caught up with discovery and KV (server's account), connected, not lagging."""
        return self._serving and self.replica.ready()

    def status(self) -> dict[str, Any]:
        replica = self.replica
        return {
            "applied_seq": replica.applied_seq,
            "stream_last_seq": replica.stream_last_seq,
            "pending": replica.follower.pending if replica.follower else None,
            "followers": {
                "kv": replica.follower.state() if replica.follower else None,
                "workers": replica.watcher.follower.state() if replica.watcher else None,
            },
            "pools": {pool: replica.pool_status(pool) for pool in self.pools},
        }

    async def _serve_once_caught_up(self) -> None:
        await self.replica.caught_up.wait()
        if self.serve_endpoints:
            assert self.rt is not None
            nc, names = self.rt.nc, self.rt.names
            for pool in self.pools:
                self._subs.append(await serve(nc, names.match(pool), MatchRequest, self._match_handler(pool), queue=QUEUE,
                                              endpoint="indexer.match"))
                self._subs.append(await serve(nc, names.dump(pool), DumpRequest, self._dump_handler(pool), queue=QUEUE,
                                              endpoint="indexer.dump"))
        self._serving = True

    # ---- the replica, in process --------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        return self.replica.applied_seq

    @property
    def admission(self) -> Admission:
        return self.replica.admission

    @property
    def follower(self) -> StreamFollower | None:
        return self.replica.follower

    @property
    def watcher(self) -> WorkerWatcher | None:
        return self.replica.watcher

    def pool_states(self) -> dict[str, PoolState]:
        return self.replica.pool_states()

    def index(self, pool: str) -> PrefixIndex:
        return self.replica.index(pool)

    def block_size(self, pool: str) -> int:
        return self.replica.core.block_size(pool)

    def restore_pool(self, pool: str, loaded: snapshot.LoadedSnapshot) -> None:
        self.replica.restore_pool(pool, loaded)

    def overlap_scores(self, pool: str, hashes: list[int], early_exit: bool = False) -> OverlapScores:
        return self.replica.overlap_scores(pool, hashes, early_exit)

    def match(self, pool: str, req: MatchRequest) -> MatchReply:
        core = self.replica.core
        return core.match_reply(pool, self.replica.overlap_scores(pool, core.hashes_of(pool, req), req.early_exit))

    def dump(self, pool: str) -> DumpReply:
        return DumpReply(stream_seq=self.applied_seq, events=self.index(pool).dump())

    def digest(self) -> dict[str, Any]:
        return self.replica.digest()

    # ---- endpoints ----------------------------------------------------------------------------

    def _match_handler(self, pool: str) -> Handler:
        async def handle(req: MatchRequest, _msg: Msg) -> MatchReply:
            return self.match(pool, req)

        return handle

    def _dump_handler(self, pool: str) -> Handler:
        async def handle(_req: DumpRequest, msg: Msg) -> DumpReply:
            reply = self.dump(pool)
            limit = self.rt.nc.max_payload if self.rt is not None else 0
            if limit:
                size = len(codec.encode(reply, codec.content_type_of(msg.headers)))
                if size > limit:
                    # A reply over the server's max_payload would be dropped and the caller time out.
                    why = f"dump of {len(reply.events)} events is {size} bytes, over the NATS max_payload of {limit}"
                    raise ServiceError(ErrorCode.OVERLOADED, why)
            return reply

        return handle

    # ---- lag ----------------------------------------------------------------------------------

    async def _lag_loop(self) -> None:
        assert self.rt is not None
        replica = self.replica
        while True:
            try:
                info = await self.rt.js.stream_info(self.rt.names.kv_stream)
                replica.stream_last_seq = info.state.last_seq
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - transient; the follower reports real trouble
                pass
            m.STREAM_LAST_SEQ.set(replica.stream_last_seq)
            m.APPLIED_SEQ.set(replica.applied_seq)
            m.CONSUMER_LAG.set(max(0, replica.stream_last_seq - replica.applied_seq))
            if replica.follower is not None:
                m.CONSUMER_PENDING.set(replica.follower.pending)
            await asyncio.sleep(self.lag_interval)


def make_app(cfg: IndexerConfig) -> IndexerApp:
    return IndexerApp(cfg)
