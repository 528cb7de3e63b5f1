"""Persisted event-id high-water marks of the relay (what makes a restart never reuse an event id).

The relay publishes through the runtime's `KvEventPublisher`, which calls `IdReservations.ensure`
before a message whose last event id is beyond the persisted mark.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from . import metrics


def id_key(pool: str, worker_id: int, dp_rank: int) -> str:
    return f"{pool}.{worker_id}.{dp_rank}"


class IdReservations:
    """Persisted event-id high-water marks, one key per (pool, worker, dp_rank) in a small KV bucket.

    The stored value R promises: no published event of that rank has an id > R. The publisher writes
    R' = last_id + step *before* publishing an id beyond R, so after a relay restart continuing from
    R + 1 can never reuse or go below a published id, even if the last writes before a crash were lost.
    """

    def __init__(self, nc: NATS, bucket: str, pool: str, worker_id: int, step: int, replicas: int = 1) -> None:
        self.nc = nc
        self.replicas = replicas
        self.bucket = bucket
        self.pool = pool
        self.worker_id = worker_id
        self.step = max(1, step)
        self.ceiling: dict[int, int] = {}
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self.nc.jetstream()
            try:
                self._kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(
                    KeyValueConfig(bucket=self.bucket, history=1, storage=StorageType.FILE, replicas=self.replicas)
                )
        return self._kv

    async def load(self, dp_rank: int) -> int:
        """The first id this relay may use for a rank."""
        kv = await self._bucket()
        try:
            entry = await kv.get(id_key(self.pool, self.worker_id, dp_rank))
            ceiling = int((entry.value or b"0").decode())
        except KeyNotFoundError:
            ceiling = 0
        self.ceiling[dp_rank] = ceiling
        return ceiling + 1

    async def ensure(self, dp_rank: int, last_id: int) -> None:
        if last_id <= self.ceiling.get(dp_rank, 0):
            return
        kv = await self._bucket()
        ceiling = last_id + self.step
        await kv.put(id_key(self.pool, self.worker_id, dp_rank), str(ceiling).encode())
        self.ceiling[dp_rank] = ceiling
        metrics.ID_RESERVATIONS.inc()
