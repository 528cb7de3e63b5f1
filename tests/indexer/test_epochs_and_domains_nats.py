"""Against a real nats-server and an in-process indexer: a publisher restarted within JetStream's
2-minute duplicate window is applied (its Nats-Msg-Id names its epoch), and a `cache_owner`
cleared published by a Dynamo-style publisher leaves the worker's blocks alone."""

from __future__ import annotations

from prometheus_client import REGISTRY

from schemas import codec
from schemas.api import MatchReply, MatchRequest
from schemas.events import cleared_event, stored_event
from services.runtime.kv_publisher import KvEventPublisher
from services.runtime.responder import request

from .conftest import NAMES, publish, register, wait_for


async def scores_of(nc, hashes: list[int]) -> dict[tuple[int, int], int]:
    reply = await request(nc, NAMES.match("p"), MatchRequest(block_hashes=hashes), MatchReply)
    return {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}


def samples(name: str, **labels: str) -> list[float]:
    """Values of `name` for pool p in every indexer alive in this process."""
    want = {"pool": "p", **labels}
    return [
        s.value for metric in REGISTRY.collect() for s in metric.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in want.items())
    ] or [0.0]


def publisher(js, epoch: int) -> KvEventPublisher:
    return KvEventPublisher(js, pool="p", worker_id=3, subject_of=lambda r: NAMES.kv_subject("p", 3, r), epoch=epoch, max_events=4)


async def test_a_restarted_publisher_is_applied_within_the_duplicate_window(nc, start_indexer):
    app = await start_indexer()
    js = nc.jetstream()
    await register(js, "p", 3)
    first = publisher(js, epoch=1_000)
    first.start()
    chain = [stored_event(3, i, [(100 + i, 10 + i)], parent_hash=(99 + i) if i > 2 else None) for i in range(2, 12)]
    await first.publish([cleared_event(3, 1), *chain])
    assert await first.flushed(5)
    await first.stop()
    await wait_for(lambda: app.index("p").cursors.get((3, 0)) == 11)
    assert await scores_of(nc, [12, 13, 14]) == {(3, 0): 3}

    second = publisher(js, epoch=2_000)  # the same worker restarted: ids from 1 again, seconds later
    second.start()
    await second.publish([cleared_event(3, 1), stored_event(3, 2, [(900, 90), (901, 91)])])
    assert await second.flushed(5)
    await second.stop()
    await wait_for(lambda: app.index("p").epochs.get((3, 0)) == 2_000 and app.index("p").cursors.get((3, 0)) == 2)
    assert await scores_of(nc, [90, 91]) == {(3, 0): 2}  # the new run's blocks
    assert await scores_of(nc, [12, 13, 14]) == {}  # its cleared dropped the old run's
    assert app.index("p").restarts == 1
    assert max(samples("kvr_indexer_publisher_restarts_total")) >= 1  # exported (other tests' indexers may be alive)

    # Seed behaviour, for contrast: without an epoch the restarted run's first message has the old
    # run's id, and JetStream drops it as a duplicate inside its window.
    old_style = await js.publish(NAMES.kv_subject("p", 3, 0), codec.encode_json([cleared_event(3, 1)]), headers={"Nats-Msg-Id": "p:3:0:1"})
    again = await js.publish(NAMES.kv_subject("p", 3, 0), codec.encode_json([cleared_event(3, 1)]), headers={"Nats-Msg-Id": "p:3:0:1"})
    assert not old_style.duplicate and again.duplicate


async def test_a_cache_owner_cleared_leaves_the_workers_blocks(nc, start_indexer):
    app = await start_indexer()
    js = nc.jetstream()
    await publish(js, "p", stored_event(4, 1, [(400, 40), (401, 41)]))
    foreign = codec.to_builtins(cleared_event(4, 2))
    foreign["residency_domain"] = "cache_owner"
    ack = await js.publish(NAMES.kv_subject("p", 4, 0), codec.encode_json([foreign]), headers={"Nats-Msg-Id": "p:4:0:2"})
    await wait_for(lambda: app.applied_seq >= ack.seq)
    assert await scores_of(nc, [40, 41]) == {(4, 0): 2}
    assert app.index("p").counters[("cleared", "other_domain")] == 1
    assert max(samples("kvr_indexer_events_total", event_type="cleared", outcome="other_domain")) >= 1


async def test_match_takes_cache_namespace_and_multimodal_with_token_ids(nc, start_indexer):
    from schemas.api import MultimodalObject
    from schemas.hashing import SEED, local_block_hashes, salt_seed

    app = await start_indexer()
    js = nc.jetstream()
    tokens = list(range(50, 50 + 32))  # 2 blocks of 16
    image = (77, 20, 8)  # block 1 only
    mm_hashes = local_block_hashes(tokens, 16, SEED, [image])
    ns_hashes = local_block_hashes(tokens, 16, salt_seed(None, "ns"))
    await publish(js, "p", stored_event(5, 1, [(500, mm_hashes[0]), (501, mm_hashes[1])]))
    seq = await publish(js, "p", stored_event(6, 1, [(600, ns_hashes[0]), (601, ns_hashes[1])]))
    await wait_for(lambda: app.applied_seq >= seq)

    async def match(**fields: object) -> dict[tuple[int, int], int]:
        reply = await request(nc, NAMES.match("p"), MatchRequest(token_ids=tokens, **fields), MatchReply)  # type: ignore[arg-type]
        return {(s.worker_id, s.dp_rank): s.blocks for s in reply.scores}

    assert await match(multimodal=[MultimodalObject(*image)]) == {(5, 0): 2}
    assert await match() == {(5, 0): 1}  # block 0 has no object: plain text
    assert await match(cache_namespace="ns") == {(6, 0): 2}
    assert await match(cache_salt="ns", cache_namespace="ns") == {(6, 0): 2}
