"""The admission queue in the scheduler service, on a real nats-server (Dynamo's scheduling queue,
GAIE flow control): a booking select that finds every eligible worker busy waits for capacity
instead of getting 429 at once, is admitted when the bookings stream frees load, in strict-priority
order, and past its deadline gets `overloaded` with a retry hint."""

from __future__ import annotations

import asyncio

import pytest

from schemas.api import SelectRequest
from schemas.codec import RemoteError

from .conftest import POOL, running_scheduler
from .test_service import cleanup, eventually, put, select

# One worker of 8 blocks; each request is 4 blocks of its own (no shared prefix). Busy above 0.9
# (Dynamo's default): two bookings fill it (8/8), so a third request waits.
WORKER = {"total_kv_blocks": 8}


def tokens(i: int) -> list[int]:
    return list(range(1000 * i, 1000 * i + 64))


async def queued(app, n: int) -> None:
    await eventually(lambda: len(app.queues[POOL]) == n)


async def test_busy_pool_queues_then_admits_in_priority_order_and_times_out_with_a_retry_hint(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "q1", "--queue-timeout-s", "10", "--queue-retry-after-s", "2") as app:
        assert app.selector.busy.active_decode_blocks == 0.9  # Dynamo's default busy threshold
        await put(nc, 1, **WORKER)
        await eventually(lambda: len(app.candidates(POOL)) == 1)
        assert (await select(nc, request_id="a", token_ids=tokens(1))).decode.worker_id == 1
        assert (await select(nc, request_id="b", token_ids=tokens(2))).decode.worker_id == 1

        # Busy: a dry run is answered at once (it books nothing), with the retry hint.
        with pytest.raises(RemoteError) as err:
            await select(nc, request_id="dry", token_ids=tokens(3), book=False)
        assert err.value.code == "overloaded" and err.value.retry_after_s == 2.0

        # Booking selects wait: a low-priority one first, then a strict-priority one.
        low = asyncio.create_task(select(nc, request_id="low", token_ids=tokens(4)))
        await queued(app, 1)
        high = asyncio.create_task(select(nc, request_id="high", token_ids=tokens(5), strict_priority=1))
        await queued(app, 2)
        assert [w.request_id for w in app.queues[POOL].ordered()] == ["high", "low"]
        assert not low.done() and not high.done()

        # One free: capacity for one request; the higher tier goes first, the other keeps waiting.
        assert (await cleanup(nc, "a", "free")).known
        assert (await asyncio.wait_for(high, 5)).decode.worker_id == 1
        await queued(app, 1)
        assert not low.done()
        assert (await cleanup(nc, "b", "free")).known
        assert (await asyncio.wait_for(low, 5)).decode.worker_id == 1
        assert app.states[POOL].tracker.is_active("high") and app.states[POOL].tracker.is_active("low")
        await queued(app, 0)

        # Full again (high + low): a select with a short deadline gets 429 with the retry hint.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RemoteError) as err:
            await select(nc, request_id="late", token_ids=tokens(6), queue_timeout_ms=300)
        waited = loop.time() - t0
        assert err.value.code == "overloaded" and err.value.retry_after_s == 2.0 and "busy" in err.value.message
        assert 0.25 <= waited < 3.0
        assert len(app.queues[POOL]) == 0 and not app.states[POOL].tracker.is_active("late")
        # queue_timeout_ms 0: no waiting at all.
        with pytest.raises(RemoteError) as err:
            await select(nc, request_id="now", token_ids=tokens(7), queue_timeout_ms=0)
        assert err.value.code == "overloaded"


async def test_a_full_queue_refuses_and_a_better_newcomer_evicts_the_last(nats_url, nc, indexer):
    async with running_scheduler(nats_url, "--router-id", "q2", "--queue-timeout-s", "10", "--queue-max-size", "1") as app:
        await put(nc, 1, **WORKER)
        await eventually(lambda: len(app.candidates(POOL)) == 1)
        await select(nc, request_id="a", token_ids=tokens(1))
        await select(nc, request_id="b", token_ids=tokens(2))
        waiting = asyncio.create_task(select(nc, request_id="w", token_ids=tokens(3)))
        await queued(app, 1)
        # Same rank, later arrival: refused at once.
        with pytest.raises(RemoteError) as err:
            await select(nc, request_id="x", token_ids=tokens(4))
        assert err.value.code == "overloaded" and "full" in err.value.message and err.value.retry_after_s is not None
        # A higher tier takes the place of the last waiting request, which is answered overloaded.
        better = asyncio.create_task(select(nc, request_id="vip", token_ids=tokens(5), strict_priority=3))
        with pytest.raises(RemoteError) as err:
            await asyncio.wait_for(waiting, 5)
        assert err.value.code == "overloaded" and "evicted" in err.value.message
        await cleanup(nc, "a", "free")
        assert (await asyncio.wait_for(better, 5)).decode.worker_id == 1


async def test_replicas_agree_on_busy_from_the_replicated_load(nats_url, nc, indexer):
    """Busy is judged on the bookings stream's load, which every replica folds: a select on a
    second replica queues behind bookings made on the first, and a free published through either
    admits it."""
    async with running_scheduler(nats_url, "--router-id", "r1", "--queue-timeout-s", "10") as one, \
            running_scheduler(nats_url, "--router-id", "r2", "--queue-timeout-s", "10") as two:
        await put(nc, 1, **WORKER)
        await eventually(lambda: len(one.candidates(POOL)) == 1 and len(two.candidates(POOL)) == 1)
        await one.select(POOL, SelectRequest(request_id="a", token_ids=tokens(1)))
        await one.select(POOL, SelectRequest(request_id="b", token_ids=tokens(2)))
        await eventually(lambda: two.states[POOL].tracker.is_active("a") and two.states[POOL].tracker.is_active("b"))
        waiting = asyncio.create_task(two.select(POOL, SelectRequest(request_id="c", token_ids=tokens(3))))
        await queued(two, 1)
        assert (await cleanup(nc, "a", "free")).known
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.decode.worker_id == 1
        await eventually(lambda: one.states[POOL].tracker.is_active("c"))
